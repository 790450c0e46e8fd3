"""``MachineConfig``: everything needed to build an identical machine (a standby, a restore)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError
from ..guests import NAMES
from ..guests.protocol import GuestParams, Pattern
from ..tracking import KINDS

MiB = 1 << 20
#: The guest name of a machine that runs a Linux program under the library OS
#: (``dirtyring.linux``): booted by the linux layer, not from a built-in program.
LINUX_GUEST = "linux"
#: Stacks of 16 KiB between 0xF0000 and the device queues at 0x100000 (machine/layout.py).
MAX_VCPUS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    """Everything needed to build an identical machine: guest program, vCPUs, memory slots,
    tracker (``ring``, ``bitmap``, ``bitmap-clear``, ``hotset`` or ``none``), ring size and the
    guest's parameters. Validated on creation (:class:`ConfigError`); ``to_json``/``from_json``
    carry it to a standby or into a snapshot.

    Example::

        cfg = dirtyring.MachineConfig(guest="dirtier", tracker="hotset",
                                      data_slots=(64 << 20,),
                                      params=dirtyring.GuestParams(pattern=dirtyring.Pattern.HOT,
                                                                   hot_pages=64))
        assert dirtyring.MachineConfig.from_json(cfg.to_json()) == cfg
    """

    guest: str = "dirtier"
    vcpus: int = 1
    data_slots: tuple[int, ...] = (64 * MiB,)  # bytes per data memslot
    tracker: str = "ring"  # ring | bitmap | bitmap-clear | hotset | none
    ring_entries: int = 4096  # per vCPU; the dirty budget of an epoch is this minus 64
    hot_epochs: int = 8
    kvmclock: bool = False  # enable kvmclock + steal time: KVM writes guest pages itself
    block_signals_in_reset: bool = True  # off only to demonstrate the host defect
    params: GuestParams = field(default_factory=GuestParams)

    def __post_init__(self) -> None:
        # Types first: a configuration also arrives from the network and from files, and a
        # float or a string that slipped through would fail much later, inside the machine.
        for name in ("vcpus", "ring_entries", "hot_epochs"):
            v = getattr(self, name)
            if type(v) is not int:
                raise ConfigError(f"{name} must be an integer, not {v!r}")
        for name in ("kvmclock", "block_signals_in_reset"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"{name} must be true or false")
        if not isinstance(self.guest, str) or not isinstance(self.tracker, str):
            raise ConfigError("guest and tracker must be names")
        if not isinstance(self.data_slots, tuple) or any(
                type(n) is not int or n <= 0 for n in self.data_slots):
            raise ConfigError(f"data_slots must be sizes in bytes, not {self.data_slots!r}")
        if not isinstance(self.params, GuestParams) or any(
                type(v) is not int and not isinstance(v, Pattern)
                for v in asdict(self.params).values()):
            raise ConfigError("guest parameters must be integers")
        if self.guest not in NAMES and self.guest != LINUX_GUEST:
            raise ConfigError(f"unknown guest {self.guest!r}; choose one of {', '.join(NAMES)}")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"vcpus must be 1..{MAX_VCPUS} (the guest layout has stacks and "
                              f"status blocks for {MAX_VCPUS}), not {self.vcpus}")
        if self.tracker not in (*KINDS, "none"):
            raise ConfigError(f"unknown tracker {self.tracker!r}; choose one of "
                              f"{', '.join((*KINDS, 'none'))}")
        n = self.ring_entries
        if self.tracker == "ring" and (n < 256 or n & (n - 1)):
            raise ConfigError(f"ring_entries must be a power of two >= 256, not {n}")
        if not self.data_slots:
            raise ConfigError("at least one data slot is needed")

    @property
    def data_bytes(self) -> int:
        return sum(self.data_slots)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["params"] = {k: int(v) for k, v in asdict(self.params).items()}
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, b: bytes) -> MachineConfig:
        try:
            d = json.loads(b)
            if not isinstance(d, dict) or not isinstance(d.get("params"), dict):
                raise ValueError("not a JSON object with params")
            p = d.pop("params")
            p["pattern"] = Pattern(p["pattern"])
            d["data_slots"] = tuple(d["data_slots"])
            return cls(**d, params=GuestParams(**p))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"machine configuration is malformed: {e}") from None
