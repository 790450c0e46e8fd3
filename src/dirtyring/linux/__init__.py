"""Layer 2b: the Linux process personality, so users bring their own programs: reading an ELF
executable, laying out its initial stack and address space, and (to come, issue 15) the library
OS that serves its syscalls inside guest memory. Sits on the machine layer and under the
products, which must not care whether a guest is a built-in program or someone's binary."""
