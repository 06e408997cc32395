"""Device-side commands: `install`, `serve`, `status`, `infer` (offline scoring)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_runtime.cli.console import console, fail
from edge_runtime.cli.flags import alias
from edge_runtime.contracts.bundle import BundleError, load_public_keys


def cmd_install(args: argparse.Namespace) -> int:
    from edge_runtime.device.config import default_target
    from edge_runtime.serving.store import ModelStore

    store = ModelStore(Path(args.state_dir))
    try:
        for given in map(Path, args.trust or []):
            pubs = sorted(given.glob("*.pub")) if given.is_dir() else [given]
            if not pubs:
                raise BundleError(f"--trust {given} is a folder without *.pub keys")
            for pub in pubs:
                store.trust(pub)
        bundle = store.install(Path(args.bundle), target=args.target or default_target(),
                               allow_downgrade=args.allow_downgrade)  # fmt: skip
    except (BundleError, OSError) as e:
        return fail(f"REFUSED {args.bundle}: {e}")
    m = bundle.manifest
    console.print(f"installed {m.name} {m.version} ({m.target}) into {store.root}; active")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_runtime.device.config import SERVE_FLAGS, ConfigError, load_config
    from edge_runtime.device.daemon import Daemon

    overrides = {path: getattr(args, path.replace(".", "__")) for path in SERVE_FLAGS.values()}
    if not args.mqtt__url:  # without --broker the daemon is offline: the fleet flags do not apply
        fleet_flags = [f for f, path in SERVE_FLAGS.items() if path.startswith("mqtt.") and overrides[path] is not None]
        if fleet_flags:
            one = len(fleet_flags) == 1
            return fail(
                f"edgert serve: {', '.join(fleet_flags)} {'is' if one else 'are'} for fleet devices only: add "
                f"--broker URL, or leave {'it' if one else 'them'} out"
            )
        overrides = {k: v for k, v in overrides.items() if not k.startswith("mqtt.")}
    try:
        config = load_config(Path(args.config) if args.config else None, overrides)
        daemon = Daemon(config)
    except (ConfigError, OSError, BundleError) as e:
        return fail(f"edgert serve: {e}")
    return daemon.run()


def cmd_status(args: argparse.Namespace) -> int:
    from edge_runtime.contracts.durable import corruption_count, inspect_only, read_json_file
    from edge_runtime.contracts.fleet import dump
    from edge_runtime.device.agent.outbox import Outbox
    from edge_runtime.device.agent.records import AgentRecords
    from edge_runtime.device.agent.state import device_state
    from edge_runtime.serving.store import ModelStore

    root = Path(args.state_dir)
    if not root.is_dir():
        return fail(f"edgert status: {root} is not a state directory")
    if not any((root / part).exists() for part in ("models", "keys", "outbox.db", "agent")):
        return fail(
            f"edgert status: {root} is not a state directory (no models/, keys/, agent/ or outbox.db; "
            "expected the --state-dir of `edgert install` or `edgert serve`)"
        )
    with inspect_only():  # look, change nothing: corrupt files are reported, not moved
        store = ModelStore(root)
        try:
            outbox = Outbox(root / "outbox.db").stats() if (root / "outbox.db").exists() else {}
        except Exception as e:
            outbox = {}
            console.print(f"outbox: cannot be read ({e}); the daemon rebuilds it at start", style="yellow")
        records = AgentRecords(root / "agent")
        seqs = read_json_file(root / "agent" / "control-seq.json", _scope_seqs, lambda: {}, "reported")
        who = read_json_file(root / "agent" / "identity.json", _identity, lambda: {}, "reported")
        state = device_state(store, outbox, records.refusals(), who.get("device", ""), who.get("group", ""),
                             who.get("target", ""), seqs, outcomes=records.outcome_of(),
                             rebuilt=corruption_count())  # fmt: skip
    if args.json:
        print(json.dumps(dump(state), indent=2))
    else:
        for name, m in state.models.items():
            print(f"{name}: active {m.version}, staged {m.staged or '-'}" + (" (update pending)" if m.pending else ""))
        o = state.outbox
        print(f"outbox: {o.depth} records, {o.bytes} bytes, {o.dropped} dropped")
        last = state.last_rollback
        print(f"last rollback: {dump(last) if last else 'none'}")
    return 0


def _identity(data: Any) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ValueError("expected an object")
    return {k: str(data[k]) for k in ("device", "group", "target") if isinstance(data.get(k), str)}


def _scope_seqs(data: Any) -> dict[str, int]:
    if not isinstance(data, dict):
        raise ValueError("expected an object")
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and k != "*floor*"}


def cmd_infer(args: argparse.Namespace) -> int:
    from edge_runtime.device.offline_scoring import run_batch
    from edge_runtime.serving.batcher import BatchSettings
    from edge_runtime.serving.runtime import Runtime

    try:
        runtime = Runtime(
            load_public_keys(args.trust), threads=args.threads, batching=BatchSettings(max_batch=args.batch)
        )
        handle = runtime.load(Path(args.bundle))
        n = run_batch(runtime, handle.name, Path(args.input), Path(args.out), Path(args.csv) if args.csv else None)
    except (BundleError, ValueError, OSError) as e:
        return fail(f"edgert infer: {e}")
    console.print(f"scored {n} new items into {args.out}")
    runtime.close()
    return 0


def add_install(sub: Any) -> None:
    from edge_runtime.contracts.targets import target_names

    inst = sub.add_parser("install", help="verify a bundle and make it the active version in a state dir")
    inst.add_argument("bundle")
    inst.add_argument("--state-dir", required=True)
    inst.add_argument("--trust", action="append", help="public key or folder of *.pub to trust (copied to STATE/keys)")
    inst.add_argument("--target", choices=target_names(), help="this device's target (default from the CPU)")
    inst.add_argument("--allow-downgrade", action="store_true", help="install a version older than the active one")
    inst.set_defaults(func=cmd_install)


def add_serve(sub: Any) -> None:
    from edge_runtime.contracts.targets import target_names
    from edge_runtime.device.config import SERVE_FLAGS, config_field

    sv = sub.add_parser("serve", help="the on-device daemon (Open Inference Protocol v2 over HTTP)")
    sv.add_argument("--config", help="YAML config (unknown keys are errors)")
    fleet = sv.add_argument_group("fleet (MQTT); without --broker the daemon is fully offline")
    for flag, path in SERVE_FLAGS.items():
        description, kind = config_field(path)
        group = fleet if path.startswith("mqtt.") else sv
        choices = target_names() if path == "target" else None
        group.add_argument(
            flag,
            dest=path.replace(".", "__"),
            metavar=None if choices else path.rpartition(".")[2].upper(),
            type=kind,
            choices=choices,
            help=f"{description} [{path}]",
        )
    for old, new, dest in (("--mqtt", "--broker", "mqtt__url"), ("--mqtt-user", "--broker-user", "mqtt__username"),
                           ("--mqtt-password-file", "--broker-password-file", "mqtt__password_file")):  # fmt: skip
        alias(sv, old, new, dest)
    sv.set_defaults(func=cmd_serve)


def add_status(sub: Any) -> None:
    st = sub.add_parser("status", help="versions, outbox and rollbacks of a state dir (no daemon needed)")
    st.add_argument("--state-dir", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)


def add_infer(sub: Any) -> None:
    inf = sub.add_parser("infer", help="score an image folder, video or .npy folder offline (resumable)")
    inf.add_argument("bundle")
    inf.add_argument("input")
    inf.add_argument("-o", "--out", required=True, help="JSON lines output; re-running resumes it")
    inf.add_argument("--csv", help="also write a CSV summary here")
    inf.add_argument("--trust", action="append", help="PUBLIC key the bundle must be signed by; required")
    alias(inf, "--key", "--trust", "trust", append=True)
    inf.add_argument("--batch", type=int, default=16)
    inf.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    inf.set_defaults(func=cmd_infer)
