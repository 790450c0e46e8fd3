"""The initial stack reads back as the program will read it: argc, argv, envp, auxv, with RSP
16-byte aligned and every pointer inside the stack; bad input is refused with a clear error."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtyring.errors import ConfigError
from dirtyring.linux import initstack as S

TOP = 0x7FFF_FFFF_F000
AUX = [(S.AT_PAGESZ, 4096), (S.AT_PHDR, 0x400040), (S.AT_PHNUM, 10), (S.AT_ENTRY, 0x401000)]
RANDOM = bytes(range(16))


def test_reads_back_as_given() -> None:
    st_ = S.build(TOP, [b"prog", b"-x", b""], [b"A=1", b"PATH=/bin"], AUX, RANDOM,
                  execfn=b"/bin/prog")
    assert st_.rsp % 16 == 0 and st_.rsp + len(st_.data) == TOP
    argv, envp, aux = S.parse(st_.data, st_.rsp)
    assert argv == [b"prog", b"-x", b""] and envp == [b"A=1", b"PATH=/bin"]
    assert {k: aux[k] for k, _ in AUX} == dict(AUX)
    off = aux[S.AT_RANDOM] - st_.rsp
    assert st_.data[off:off + 16] == RANDOM and aux[S.AT_RANDOM] == st_.random
    plat = aux[S.AT_PLATFORM] - st_.rsp
    assert st_.data[plat:plat + 7] == b"x86_64\0"
    ex = aux[S.AT_EXECFN] - st_.rsp
    assert st_.data[ex:ex + 10] == b"/bin/prog\0"
    assert st_.data[-8:] == bytes(8)  # the end marker Linux leaves at the top


@settings(max_examples=200, deadline=None)
@given(argv=st.lists(st.binary(max_size=40).filter(lambda b: b"\0" not in b), min_size=1,
                     max_size=12),
       envp=st.lists(st.binary(max_size=40).filter(lambda b: b"\0" not in b), max_size=12))
def test_any_arguments_round_trip_aligned(argv: list[bytes], envp: list[bytes]) -> None:
    st_ = S.build(TOP, argv, envp, AUX, RANDOM)
    assert st_.rsp % 16 == 0
    got_argv, got_envp, aux = S.parse(st_.data, st_.rsp)
    assert (got_argv, got_envp) == (argv, envp)
    assert all(st_.rsp <= p < TOP for p in (*st_.argv, *st_.envp, aux[S.AT_RANDOM],
                                             aux[S.AT_EXECFN], aux[S.AT_PLATFORM]))


@pytest.mark.parametrize("kw, message", [
    (dict(argv=[]), "at least argv"),
    (dict(argv=[b"a\0b"]), "NUL byte"),
    (dict(random16=b"short"), "16 bytes"),
    (dict(top=TOP + 8), "aligned"),
    (dict(envp=[b"X" * (S.MAX_ARG_BYTES)]), "exceed"),
])
def test_bad_input_is_refused(kw: dict, message: str) -> None:
    args = dict(top=TOP, argv=[b"p"], envp=[], auxv=AUX, random16=RANDOM) | kw
    with pytest.raises(ConfigError, match=message):
        S.build(**args)
