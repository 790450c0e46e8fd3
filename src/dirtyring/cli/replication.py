"""``dirtyring protect`` (primary), ``dirtyring standby`` and ``dirtyring failover``."""
from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, DirtyringError
from ..guests import NAMES
from ..guests.protocol import GuestParams, Pattern
from ..linux.output import STREAMS, ProgramOutput
from ..linux.program import LinuxProgram
from ..linux.runner import CRASH_STATUS
from ..machine.config import LINUX_GUEST, MachineConfig
from ..machine.vm import Machine
from ..replication.arbiter import DEFAULT_MARGIN, DEFAULT_TTL, Arbiter
from ..replication.kvservice import KvService
from ..replication.output_commit import OutputGate
from ..replication.primary import Primary, PrimaryOptions
from ..replication.reprotect import reprotect
from ..replication.standby import Standby
from ..replication.transport import connect, listen, load_key, parse_addr
from .commands import command_help
from .exec_options import add_exec_options, finished_status, guest_or_program, program_sink
from .options import add_guest_options, add_metrics_option, duration, positive_int, start_metrics
from .printer import EventPrinter


def _render(p: EventPrinter, e: dict[str, Any]) -> bool:
    if e["event"] != "stats":
        return False
    p.status(f"[{e['state']:>9}] epoch {e['epoch']:7d}  {e['epochs_per_s']:6.0f} ckpt/s"
             f"  pause p50 {e['pause_us_p50']:5.0f} µs p99 {e['pause_us_p99']:6.0f} µs"
             f"  {e['dirty_pages_per_epoch']:5.0f} pages/epoch  {e['mb_per_s']:6.1f} MB/s"
             f"  ack {e['ack_ms_p50']:5.2f} ms  held {e['output_held']:4d}")
    return True


def _printer(as_json: bool, live: bool) -> EventPrinter:
    return EventPrinter(as_json, live, _render)


NO_ETCD_WARNING = (
    "WARNING: no --etcd: nothing arbitrates between primary and standby, so a network "
    "partition between them can leave TWO live copies (each releasing output, and "
    "acknowledged writes lost). Give both --etcd URL[,URL...] and the same --name GROUP.")


def _add_etcd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", metavar="URL[,URL...]",
                   help="etcd members (http://HOST:PORT) holding the group's key: only its "
                        "holder may release output or go live (default: none, see the warning)")
    p.add_argument("--name", metavar="GROUP", default="default",
                   help="the protected guest's group name in etcd, the same on primary and "
                        "standby (default \"default\")")
    p.add_argument("--lease-ttl", type=positive_int, default=DEFAULT_TTL, metavar="SECONDS",
                   help=f"etcd lease time to live in seconds (default {DEFAULT_TTL}): a lost "
                        "primary host costs this long before the standby may go live")


def _add_output_options(p: argparse.ArgumentParser, role: str) -> None:
    """--stdout/--stderr PATH: where a protected Linux program's output is written."""
    after = " after a failover" if role == "standby" else ""
    for stream in STREAMS:
        p.add_argument(f"--{stream}", metavar="PATH", default=None,
                       help=f"--exec: write the program's {stream}{after} to this file, each "
                            "chunk at its byte offset, so a standby given the same file "
                            "continues it exactly once across a failover (default: our own "
                            f"{stream}; output is then at least once across a failover)")


def _arbiter(args: argparse.Namespace, who: str) -> Arbiter | None:
    """The group's key in etcd, or None without --etcd (then ``_warn_no_etcd`` once started:
    a user's mistake still ends in one clear line)."""
    if not args.etcd:
        return None
    return Arbiter(args.etcd, args.name, who=who, ttl=args.lease_ttl,
                   margin=min(DEFAULT_MARGIN, args.lease_ttl / 3))


def _warn_no_etcd(args: argparse.Namespace) -> None:
    if not args.etcd:
        print(NO_ETCD_WARNING, file=sys.stderr, flush=True)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("protect", help=command_help("protect"))
    p.add_argument("guest", nargs="?", choices=NAMES, default=None,
                   help="built-in guest program to run (default: none; name one, or use "
                        "--exec)")
    p.add_argument("--standby", required=True, metavar="HOST:PORT",
                   help="the standby's --listen address (required)")
    p.add_argument("--key", help="shared key, hex (or $DIRTYRING_KEY)")
    p.add_argument("--insecure", action="store_true", help="no key (trusted loopback only)")
    add_guest_options(p)
    p.add_argument("--interval", type=duration, default=1e-3, metavar="DURATION",
                   help="epoch length (default 1ms)")
    p.add_argument("--budget", type=positive_int, default=None, metavar="PAGES",
                   help="end an epoch early after about this many dirty pages (ring only; "
                        "default: no budget)")
    p.add_argument("--heartbeat", type=duration, default=0.1, metavar="DURATION",
                   help="heartbeat interval (default 100ms)")
    p.add_argument("--heartbeat-timeout", type=duration, default=1.0, metavar="DURATION",
                   help="declare the standby lost after this long without a frame (default 1s)")
    p.add_argument("--unsafe-output", action="store_true",
                   help="release guest output before its checkpoint is acknowledged (benchmarks)")
    p.add_argument("--verify", action="store_true",
                   help="send a memory digest with every epoch (the standby checks it)")
    p.add_argument("--serve", metavar="HOST:PORT",
                   help="key-value clients port (kvstore; default: none)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this many seconds (default: no limit)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of the live view")
    _add_etcd_options(p)
    add_metrics_option(p)
    add_exec_options(p)
    _add_output_options(p, "primary")
    p.set_defaults(func=protect)

    s = sub.add_parser("standby", help=command_help("standby"))
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to wait for the primary on (required)")
    s.add_argument("--key", help="shared key, hex (or $DIRTYRING_KEY)")
    s.add_argument("--insecure", action="store_true", help="no key (trusted loopback only)")
    s.add_argument("--heartbeat", type=duration, default=0.1, metavar="DURATION",
                   help="heartbeat interval (default 100ms)")
    s.add_argument("--heartbeat-timeout", type=duration, default=1.0, metavar="DURATION",
                   help="treat the primary as failed after this long without a frame "
                        "(default 1s)")
    s.add_argument("--verify", action="store_true", help="check memory digests at every commit")
    s.add_argument("--no-auto-failover", action="store_true",
                   help="only fail over on `dirtyring failover`")
    s.add_argument("--arbiter", metavar="COMMAND",
                   help="split-brain guard: run COMMAND before an automatic failover and go "
                        "live only if it exits 0 (it gets DIRTYRING_EPOCH, DIRTYRING_REASON)")
    s.add_argument("--arbiter-timeout", type=duration, default=5.0, metavar="DURATION",
                   help="how long the --arbiter command may take; no answer means no "
                        "failover (default 5s)")
    s.add_argument("--serve", metavar="HOST:PORT",
                   help="key-value clients port after failover (default: none)")
    s.add_argument("--reprotect", metavar="HOST:PORT",
                   help="after a failover, protect the guest with the standby at HOST:PORT "
                        "(full sync, then checkpoints; retried until it answers)")
    s.add_argument("--interval", type=duration, default=0.001, metavar="DURATION",
                   help="epoch length once re-protecting (default 1ms)")
    s.add_argument("--control", metavar="HOST:PORT",
                   help="control port for `dirtyring failover` / status (default: none)")
    s.add_argument("--json", action="store_true", help="JSON lines instead of the live view")
    _add_etcd_options(s)
    add_metrics_option(s)
    _add_output_options(s, "standby")
    s.set_defaults(func=standby)

    f = sub.add_parser("failover", help=command_help("failover"))
    f.add_argument("control", metavar="HOST:PORT", help="the standby's --control address")
    f.add_argument("--status", action="store_true", help="only print the standby's status")
    f.set_defaults(func=failover_cmd)


def protect(args: argparse.Namespace) -> int:
    key, insecure = load_key(args.key, allow_insecure=args.insecure)
    ring = 4096
    if args.budget:
        ring = 1 << max(8, (args.budget + 64 - 1).bit_length())
    prog = guest_or_program(args)
    if prog is not None:
        if args.serve:
            raise ConfigError("--serve is the kvstore guest's; a program has no key-value port")
        cfg = prog.config(tracker=args.tracker, ring_entries=ring)
    else:
        if args.stdout or args.stderr:
            raise ConfigError("--stdout and --stderr need --exec PROGRAM")
        cfg = MachineConfig(guest=args.guest, tracker=args.tracker, vcpus=args.vcpus,
                            data_slots=(args.memory,), ring_entries=ring,
                            params=GuestParams(pattern=Pattern[args.pattern.upper()],
                                               hot_pages=args.hot_pages, rate_pps=args.rate))
    # A program's own output owns our stdout: the events go to stderr then.
    live = (sys.stderr if prog else sys.stdout).isatty() and not args.json
    out = EventPrinter(args.json, live, _render, file=sys.stderr if prog else None)
    args.program = prog
    if args.unsafe_output:
        print("WARNING: --unsafe-output: guest output is released BEFORE its checkpoint is "
              "acknowledged; a failover can lose what clients were told", file=sys.stderr)
    opt = PrimaryOptions(interval=args.interval, heartbeat_interval=args.heartbeat,
                         heartbeat_timeout=args.heartbeat_timeout,
                         unsafe_output=args.unsafe_output, verify=args.verify)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    metrics = start_metrics(args.metrics)  # first: a bad address ends the command at once
    try:
        return _protect(args, cfg, key, insecure, opt, out, stop, metrics)
    finally:
        if metrics is not None:
            metrics.close()


def _protect(args: argparse.Namespace, cfg: MachineConfig, key: bytes, insecure: bool,
             opt: PrimaryOptions, out: EventPrinter, stop: threading.Event,
             metrics: Any) -> int:
    if metrics is not None:
        out({"event": "metrics", "t": time.time(),
             "addr": f"{metrics.addr[0]}:{metrics.port}"})
    arbiter = _arbiter(args, "primary")
    if arbiter is not None:
        # Before anything else: another live copy of this guest means we must not start.
        token = arbiter.acquire(wait=args.lease_ttl + 1.0)
        out({"event": "lease_granted", "group": arbiter.group, "revision": token,
             "ttl_s": arbiter.ttl})
    # Connect before the VM exists: see Primary.connect (a death is noticed ~25 ms sooner).
    sock = connect(parse_addr(args.standby))
    _warn_no_etcd(args)
    prog: LinuxProgram | None = args.program
    streams = None
    release: Callable[[str, Any, int], None] | None = None
    if prog is not None:
        streams = ProgramOutput({"stdout": args.stdout, "stderr": args.stderr},
                                fallback=_OWN_STREAMS, truncate=True)
        release = _program_release(streams, prog.name)
    # One vCPU runs inline on this thread (no thread hand-offs per epoch); more use threads.
    with Machine(cfg, threaded=cfg.vcpus > 1, boot=prog.boot if prog else True) as m:
        svc = None
        if args.serve:
            svc = KvService(m.kv, parse_addr(args.serve))
            release = svc.release
        if streams is not None:
            streams.bind(m.stdio)
        prim = Primary(m, parse_addr(args.standby), key, insecure=insecure, options=opt,
                       on_event=out, release=release, arbiter=arbiter)
        collector = None
        if metrics is not None:
            from ..replication.metrics import PrimaryCollector
            collector = PrimaryCollector(prim)
            metrics.add(collector)
        try:
            prim.connect(sock)
            prim.run(args.seconds, stop=stop)
            if m.finished:
                prim.finish(stop)  # its last output is written before anyone hears it ended
        except KeyboardInterrupt:
            pass
        finally:
            prim.close()
            if collector is not None:
                metrics.remove(collector)  # (before the machine's memory goes)
            if arbiter is not None:
                arbiter.release()
            if svc:
                svc.close()
            if streams is not None:
                streams.close()
        out({"event": "done", **prim.snapshot()})
        if prog is None:
            return 0
        return _program_status(m, prim.fenced)


#: A program's output streams when no file is named: ours.
_OWN_STREAMS: dict[str, Any] = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}


def _program_release(streams: ProgramOutput, name: str) -> Callable[[str, Any, int], None]:
    """The output gate's release for a Linux program: its streams, and each unsupported
    syscall named once on our stderr."""
    named = program_sink(name)

    def release(kind: str, payload: Any, epoch: int) -> None:
        if kind in STREAMS:
            streams.write(kind, bytes(payload))
        else:
            named(kind, payload)
    return release


def _program_status(m: Machine, fenced: bool) -> int:
    """What dirtyring exits with for a protected program: its own status once it ended, the
    shell's SIGSEGV status if it crashed, 1 if this copy was fenced (another runs it), 0 for a
    planned stop."""
    if m.crashed:
        print(f"dirtyring: {m.crashed}", file=sys.stderr, flush=True)
        return CRASH_STATUS
    if m.finished:
        return finished_status(m)
    return 1 if fenced else 0


def standby(args: argparse.Namespace) -> int:
    key, insecure = load_key(args.key, allow_insecure=args.insecure)
    out = _printer(args.json, False)
    svc_holder: dict[str, KvService] = {}
    # Once live with --etcd, output leaves only while the lease surely holds (held, never
    # dropped, otherwise): the same rule as a primary without its standby.
    alone = OutputGate(lambda kind, payload, _: release(kind, payload, sb.committed_epoch),
                       hold=False)
    lost_key = threading.Event()

    def sink(kind: str, payload: Any) -> None:
        """Output of the guest once this standby runs it (after failover)."""
        alone.emit(kind, payload)

    #: A Linux program's output streams once this standby runs it (``on_restored``).
    streams: list[ProgramOutput] = []
    named: list[Callable[[str, Any], None]] = []

    def release(kind: str, payload: Any, epoch: int) -> None:
        """... also once re-protected: then held until the new standby committed ``epoch``."""
        if streams and kind in STREAMS:
            streams[0].write(kind, bytes(payload))
        elif named and kind == "unsupported_syscall":
            named[0](kind, payload)
        elif kind == "kv":
            svc = svc_holder.get("svc")
            if svc is not None:
                svc.release(kind, payload, epoch)
        elif kind == "report":
            vcpu, step, value = payload
            out({"event": "report", "vcpu": vcpu, "step": step, "hash": value})
        else:
            out({"event": "output", "kind": kind, "data": repr(payload)})

    sb = Standby(parse_addr(args.listen), key, insecure=insecure,
                 heartbeat_timeout=args.heartbeat_timeout, heartbeat_interval=args.heartbeat,
                 verify=args.verify, auto_failover=not args.no_auto_failover,
                 arbiter=args.arbiter, arbiter_timeout=args.arbiter_timeout, on_event=out,
                 sink=sink, etcd=_arbiter(args, "standby"))
    sb.output = alone

    def on_event(e: dict[str, Any]) -> None:
        if e["event"] == "standby_vm_created" and e.get("guest") == LINUX_GUEST \
                and not args.stdout:
            out.file = sys.stderr  # a program's output may own our stdout after a failover
        out(e)

    def on_restored(m: Machine) -> None:
        """Failover: a Linux program's streams continue where the checkpoint says."""
        if m.stdio is not None and not streams:
            streams.append(ProgramOutput({"stdout": args.stdout, "stderr": args.stderr},
                                         fallback=_OWN_STREAMS, truncate=False))
            named.append(program_sink("program"))
        if streams:
            streams[0].bind(m.stdio)
    sb.on_event = on_event
    sb.on_restored = on_restored
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    metrics = start_metrics(args.metrics)
    if metrics is not None:
        from ..replication.metrics import StandbyCollector
        metrics.add(StandbyCollector(sb))
        out({"event": "metrics", "t": time.time(),
             "addr": f"{metrics.addr[0]}:{metrics.port}"})
    ctl = None
    status: int | None = None
    if args.control:
        ctl = _control_server(parse_addr(args.control), sb, stop)
    try:
        _warn_no_etcd(args)
        sb.serve(stop)
        if sb.failed_over.is_set() and sb.state == "failed_over":
            if sb.etcd is not None:
                alone.unhold(sb.etcd.may_release)
                sb.etcd.on_lost = lambda why: lost_key.set()
            if args.serve and sb.machine is not None:
                svc_holder["svc"] = KvService(sb.machine.kv, parse_addr(args.serve))
                out({"event": "serving", "addr": args.serve})
            if args.reprotect:
                reprotect(sb, parse_addr(args.reprotect), key, stop=stop, insecure=insecure,
                          options=PrimaryOptions(interval=args.interval,
                                                 heartbeat_interval=args.heartbeat,
                                                 heartbeat_timeout=args.heartbeat_timeout),
                          on_event=out, release=release, arbiter=sb.etcd)
            was_held = False
            while not stop.is_set():
                if lost_key.is_set() and sb.machine is not None:
                    sb.machine.pause_all()  # another copy may be live: stop this one
                    out({"event": "fenced", "reason": f"lost the group's key in etcd "
                         f"({sb.etcd.lost if sb.etcd else ''}); stopping this copy"})
                    sb.state = "fenced"
                    break
                alone.flush()
                held = not alone.releasing
                if held != was_held:  # (with --etcd: output waits while the lease is unsure)
                    was_held = held
                    out({"event": "output_hold", "t": time.time(), "held": held,
                         "pieces": alone.held, **sb.lease_fields()})
                if sb.machine is not None and sb.machine.wait_stopped(0.5):
                    out({"event": "guest_stopped", "crash": sb.machine.crashed})
                    if sb.machine.stdio is not None:  # a program: exit with its status
                        sb.machine.drain_output()
                        alone.flush()
                        status = _program_status(sb.machine, False)
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if "svc" in svc_holder:
            svc_holder["svc"].close()
        if ctl is not None:
            ctl.close()
        if metrics is not None:
            metrics.close()
        sb.close()
        if sb.etcd is not None:
            sb.etcd.release()  # (a stop: nobody need wait out our lease)
        for st in streams:
            st.close()
    if status is not None:
        return status
    return 0 if sb.state in ("failed_over", "following", "protected", "waiting") else 1


def _control_server(addr: tuple[str, int], sb: Standby, stop: threading.Event) -> socket.socket:
    srv = listen(addr)
    srv.settimeout(0.2)

    def loop() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with c:
                try:
                    cmd = c.recv(256).decode(errors="replace").strip()
                    if cmd == "failover":
                        sb.request_failover()
                        sb.failed_over.wait(5.0)
                    elif cmd != "status":
                        c.sendall(json.dumps({"error": f"unknown command {cmd!r}"}).encode())
                        continue
                    c.sendall((json.dumps(sb.status()) + "\n").encode())
                except OSError:
                    pass

    threading.Thread(target=loop, name="control", daemon=True).start()
    return srv


def control_request(addr: tuple[str, int], cmd: str, timeout: float = 10.0) -> bytes:
    """Send one command ("status" or "failover") to a standby's control port; its JSON line.
    Raises OSError if the port cannot be reached."""
    with socket.create_connection(addr, timeout=timeout) as c:
        c.sendall(cmd.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def failover_cmd(args: argparse.Namespace) -> int:
    try:
        data = control_request(parse_addr(args.control), "status" if args.status else "failover")
    except OSError as e:
        raise DirtyringError(f"cannot reach the standby's control port {args.control}: "
                             f"{e.strerror or e}") from None
    print(data.decode().strip())
    return 0
