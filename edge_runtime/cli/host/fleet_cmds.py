"""`edgert fleet ...`: the operator's side of the fleet. Exit codes: 0 done, 1 refused or aborted
(the message says why), 2 usage.

    edgert fleet --broker mqtt://HOST:PORT --signing-key FLEET_KEY [--state FILE] COMMAND ...

--json output is stable (README "Fleet rollouts" documents the fields); human output uses rich
tables and prints every controller decision as it is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edge_runtime.cli.flags import alias
from edge_runtime.contracts.bundle import load_private_key
from edge_runtime.fleet.controller import Controller, FleetError, RolloutParams
from edge_runtime.fleet.db import ControllerDB, Rollout
from edge_runtime.fleet.link import BrokerAuth, FleetLink
from edge_runtime.fleet.views import device_json, rollout_json

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, log_path=False)


def default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgert" / "fleet.db"


def _link(args: argparse.Namespace, db: ControllerDB, need_key: bool) -> FleetLink:
    if not args.broker:
        raise FleetError("--broker mqtt://HOST:PORT is required")
    key = None
    if args.signing_key:
        key = load_private_key(Path(args.signing_key))
    elif need_key:
        raise FleetError(
            "this command publishes signed desired state: --signing-key FLEET_KEY (the private key) is required"
        )
    auth = BrokerAuth.parse(args.broker, args.username, args.password_file, args.tls_ca)
    return FleetLink(auth, key, db)


def _run(args: argparse.Namespace, need_key: bool, fn: Any) -> int:
    db = ControllerDB(Path(args.state) if args.state else default_state())
    try:
        with _link(args, db, need_key) as link:
            say = (lambda m: None) if getattr(args, "json", False) else (lambda m: err.print(f"· {m}", markup=False))
            return int(fn(Controller(link, db, say), link, db))
    except (FleetError, ConnectionError, ValueError, OSError) as e:
        err.print(f"edgert fleet {args.fleet_command}: {e}", style="red", markup=False)
        return 1
    finally:
        db.close()


# --- devices -------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace) -> int:
    def run(ctl: Controller, link: FleetLink, db: ControllerDB) -> int:
        devices = [device_json(v) for v in link.group(args.group)]
        if args.json:
            print(json.dumps({"devices": devices}, indent=1))
            return 0
        t = Table(title=f"{len(devices)} devices" + (f" in group {args.group}" if args.group else ""))
        for col in ("device", "group", "online", "last seen", "models", "health", "outbox", "refused"):
            t.add_column(col)
        for d in devices:
            models = ", ".join(
                f"{n} {m['serving']}"
                + (f" (+{m['standby']} warm)" if m["standby"] else "")
                + (f" [{m['experiment']}]" if m["experiment"] else "")
                for n, m in d["models"].items()
            )
            health = []
            for n, m in d["models"].items():
                oc = m.get("outcome") or {}
                if oc.get("outcome") and oc["outcome"] != "committed":
                    health.append(f"{n} {oc['version']} {oc['outcome']}")
                if m["error_rate"]:
                    health.append(f"{n} errors {m['error_rate']:.1%}")
            ago = f"{time.time() - d['last_seen']:.0f} s ago" if d["last_seen"] else "-"
            t.add_row(
                d["id"],
                d["group"],
                "yes" if d["online"] else "[red]no[/red]",
                ago,
                models or "-",
                "; ".join(health) or "ok",
                str(d["outbox"]["depth"]) if d["outbox"] else "-",
                str(sum(d["control_refused"].values())),
            )
        out.print(t)
        return 0

    return _run(args, False, run)


def cmd_enroll(args: argparse.Namespace) -> int:
    """Move a device to another group on the fleet's record (no broker needed)."""
    db = ControllerDB(Path(args.state) if args.state else default_state())
    try:
        before = db.device_groups().get(args.device)
        group = db.enroll(args.device, args.group, replace=True)
    finally:
        db.close()
    if args.json:
        print(json.dumps({"device": args.device, "group": group, "was": before}))
    else:
        out.print(f"{args.device}: group {before or '(not enrolled)'} -> {group}")
    return 0


# --- publish -------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    def run(ctl: Controller, link: FleetLink, db: ControllerDB) -> int:
        size = Path(args.bundle).stat().st_size
        with err.status(f"verifying and publishing {args.bundle} ({size / 1e6:.1f} MB)"):
            info = ctl.publish(Path(args.bundle), [Path(t) for t in args.trust], args.url, not args.no_chunks)
        if args.json:
            print(json.dumps(info))
        else:
            where = [f"{info['chunks']} retained chunks on the broker"] if info["chunks"] else []
            where += [info["url"]] if info["url"] else []
            out.print(
                f"published {info['name']} {info['version']} ({info['target']}, {info['size']} bytes, "
                f"sha256 {info['sha256'][:12]}) as {' and '.join(where)}",
                markup=False,
            )
        return 0

    return _run(args, False, run)


# --- rollouts ------------------------------------------------------------------------


def print_rollout(ctl: Controller, r: Rollout) -> None:
    j = rollout_json(ctl, r)
    ro = j["rollout"]
    colour = {"completed": "green", "aborted": "red", "rolled-back": "yellow"}.get(ro["status"], "cyan")
    out.print(
        f"rollout {ro['id']}: {ro['strategy']} {ro['name']} {ro['from_version']} -> {ro['version']} "
        f"(group {ro['group']}) [{colour}]{ro['status']}[/{colour}]"
    )
    if ro["reason"]:
        out.print(f"  {ro['reason']}", markup=False)
    g = j["group"]
    out.print(
        f"  group: {g['devices']} devices, {g['online']} online; serving "
        + ", ".join(f"{v}: {n}" for v, n in sorted(g["serving"].items())),
        markup=False,
    )
    if g["offline_behind"]:
        out.print(f"  offline, converge on reconnect: {', '.join(g['offline_behind'])}", markup=False)
    if j["counts"]:
        out.print("  moved devices: " + ", ".join(f"{k} {n}" for k, n in sorted(j["counts"].items())), markup=False)
    exp = j["experiment"]
    if exp and exp["variants"]:
        t = Table(title=f"{exp['kind']}: per-version figures over {exp['devices_reporting']} devices")
        for col in (
            "version",
            "role",
            "devices",
            "rows",
            "error rate",
            "mean compute ms",
            "p95 ms (median)",
            "top-1 share",
        ):
            t.add_column(col)
        for ver, a in sorted(exp["variants"].items()):
            role = "served" if ver == exp["served"] else ("shadow" if exp["kind"] == "shadow" else "variant B")
            t.add_row(
                ver,
                role,
                str(a["devices"]),
                str(a["rows"]),
                _pct(a["error_rate"]),
                _num(a["mean_compute_ms"]),
                _num(a["p95_ms_median_of_devices"]),
                " ".join(f"{c}:{s:.2f}" for c, s in a["top1_share"].items()),
            )
        out.print(t)
        if exp["shadow"]:
            s = exp["shadow"]
            out.print(
                f"  shadow agreement: top-1 {_pct(s.get('top1_agreement'))} over {s.get('classified', 0)} rows,"
                f" mean |diff| {_num(s.get('mean_abs_diff'), 4)}, max |diff| {_num(s.get('max_abs_diff'), 4)},"
                f" dropped {s.get('dropped', 0)}",
                markup=False,
            )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _name_version(text: str) -> tuple[str, str]:
    name, sep, version = text.partition(":")
    if not sep or not name or not version:
        raise FleetError(f"expected NAME:VERSION such as orientation:1.1.0, got {text!r}")
    return name, version


def _finish(ctl: Controller, r: Rollout, as_json: bool) -> int:
    if as_json:
        print(json.dumps(rollout_json(ctl, r), indent=1))
    else:
        print_rollout(ctl, r)
    return 1 if r.status in ("aborted", "aborting") else 0


def _drive(ctl: Controller, rid: int, args: argparse.Namespace) -> int:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        r = ctl.drive(rid, progress=lambda r: _check_stop(stop))
    except KeyboardInterrupt:
        err.print(f"stopped driving rollout {rid}; it stays where it is: `edgert fleet resume {rid}` goes on")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _finish(ctl, r, args.json)


def _check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise KeyboardInterrupt


def cmd_rollout(args: argparse.Namespace) -> int:
    def run(ctl: Controller, link: FleetLink, db: ControllerDB) -> int:
        name, version = _name_version(args.target)
        try:
            steps = [float(s.rstrip("%")) for s in args.steps.split(",")] if args.steps else []
        except ValueError:
            raise FleetError(f"--steps expects percentages such as 1,10,50,100, got {args.steps!r}") from None
        params = RolloutParams(
            steps=steps,
            min_devices=args.min_devices,
            max_failure_rate=args.max_failure_rate,
            health_window=args.health_window,
            min_inferences=args.min_inferences,
            stage_timeout=args.stage_timeout,
            split=args.split,
            max_error_rate=args.max_error_rate,
            max_p95_ratio=args.max_p95_ratio,
            min_p95_increase_ms=args.min_p95_increase_ms,
            unjudged=args.unjudged,
        )
        rid = ctl.create(name, version, args.group, args.strategy, params)
        if args.detach:
            print(json.dumps({"rollout": rid}) if args.json else f"rollout {rid} created; `edgert fleet resume {rid}`")
            return 0
        return _drive(ctl, rid, args)

    return _run(args, True, run)


def cmd_resume(args: argparse.Namespace) -> int:
    return _run(args, True, lambda ctl, link, db: _drive(ctl, ctl.resolve(args.rollout).id, args))


def _status_offline(args: argparse.Namespace) -> int:
    """`fleet status` without --broker: what the controller's own state file records (the rollout,
    each device's part, the decisions); the live view of the group needs the broker."""
    db = ControllerDB(Path(args.state) if args.state else default_state())
    try:
        if args.rollout is not None:
            r = db.rollout(args.rollout)
        else:
            found = db.rollouts(active_only=False)
            r = found[-1] if found else None
        if r is None:
            err.print(f"edgert fleet status: no rollout {args.rollout or ''} in {db.path}".replace("  ", " "),
                      style="red", markup=False)  # fmt: skip
            return 1
        parts: dict[str, int] = {}
        for d in r.devices.values():
            parts[str(d.get("status", "?"))] = parts.get(str(d.get("status", "?")), 0) + 1
        decisions = db.decisions(r.id)
        if args.json:
            doc = {"rollout": {"id": r.id, "name": r.name, "version": r.version, "from_version": r.from_version,
                               "group": r.group, "strategy": r.strategy, "status": r.status, "phase": r.phase,
                               "reason": r.reason}, "devices": parts, "decisions": decisions[-args.log :],
                   "live": None}  # fmt: skip
            print(json.dumps(doc, indent=1))
            return 0
        out.print(f"rollout {r.id}: {r.strategy} {r.name} {r.from_version} -> {r.version} (group {r.group}) "
                  f"{r.status}, stage {r.phase}", markup=False)  # fmt: skip
        if r.reason:
            out.print(f"  {r.reason}", markup=False)
        if parts:
            out.print("  devices: " + ", ".join(f"{k} {n}" for k, n in sorted(parts.items())), markup=False)
        out.print("  (from the state file alone: pass --broker for the group's live view)", markup=False)
        for d in decisions[-args.log :]:
            out.print(f"  {time.strftime('%H:%M:%S', time.localtime(d['ts']))} {d['message']}", markup=False)
        return 0
    finally:
        db.close()


def cmd_status(args: argparse.Namespace) -> int:
    if not args.broker:
        return _status_offline(args)

    def run(ctl: Controller, link: FleetLink, db: ControllerDB) -> int:
        r = ctl.resolve(args.rollout, active=False)
        if r.status == "observing" and link.key is not None:
            r = ctl.step(r.id)  # shadow/A-B: the automatic abort is judged whenever the controller looks
        if args.json:
            print(json.dumps(rollout_json(ctl, r), indent=1))
        else:
            print_rollout(ctl, r)
            for d in db.decisions(r.id)[-args.log :]:
                out.print(f"  {time.strftime('%H:%M:%S', time.localtime(d['ts']))} {d['message']}", markup=False)
        return 0

    return _run(args, False, run)


def cmd_abort(args: argparse.Namespace) -> int:
    def run(ctl: Controller, link: FleetLink, db: ControllerDB) -> int:
        _finish(ctl, ctl.abort(args.rollout, args.reason), args.json)
        return 0  # the abort itself succeeded

    return _run(args, True, run)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _run(args, True, lambda ctl, link, db: _finish(ctl, ctl.rollback(args.rollout), args.json))


def cmd_promote(args: argparse.Namespace) -> int:
    def run(ctl: Controller, link: FleetLink, db: ControllerDB) -> int:
        r = ctl.promote(args.rollout)
        return _drive(ctl, r.id, args)

    return _run(args, True, run)


# --- console -------------------------------------------------------------------------


def cmd_console(args: argparse.Namespace) -> int:
    """The web console: the fleet, rollouts and experiments, live; actions behind a token."""
    import secrets

    from edge_runtime.fleet.console.auth import Gate
    from edge_runtime.fleet.console.server import ConsoleApp, ConsoleServer, is_loopback

    loopback = is_loopback(args.host)
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            err.print(f"edgert fleet console: cannot read --token-file: {e}", style="red", markup=False)
            return 2
    elif not loopback:
        err.print(
            f"edgert fleet console: listening on {args.host} shows the fleet to the network: --token-file FILE "
            "(a token or password, 16 characters or more) is required there; reading and acting will need it",
            style="red",
            markup=False,
        )
        return 2
    else:
        token = secrets.token_urlsafe(24)

    def run(ctl: Controller, link: FleetLink, db: ControllerDB) -> int:
        app = ConsoleApp(ctl, Gate(token, loopback), link.auth.url, db.path, args.sample_period)
        try:
            server = ConsoleServer((args.host, args.port), app)
        except OSError as e:
            raise FleetError(f"cannot listen on {args.host}:{args.port}: {e}") from None
        bound, port = server.server_address[:2]
        host = bound.decode() if isinstance(bound, bytes) else str(bound)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        app.start()
        out.print(f"edgert fleet console on {url}", markup=False)
        if args.token_file:
            who = "reading needs no login on loopback; " if loopback else "reading and "
            out.print(f"{who}acting needs the token in {args.token_file}", markup=False)
        else:
            out.print(f"log in to act (the token is made for this run): {url}login?token={token}", markup=False)
        if link.key is None:
            out.print("no --signing-key: the console shows the fleet but cannot change it", markup=False)
        sys.stdout.flush()
        previous = signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
        try:
            server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            app.stop()
            server.server_close()
        return 0

    return _run(args, False, run)


# --- simulate ------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from edge_runtime.fleet.simulate import SimSettings, Simulation

    if not args.broker:
        err.print("edgert fleet simulate: --broker mqtt://HOST:PORT is required", style="red")
        return 2
    auth = BrokerAuth.parse(args.broker, None, args.device_password_file)
    try:
        levels = tuple(float(x) for x in args.levels.split(","))
    except ValueError:
        err.print(f"--levels expects numbers such as 0.3,0.5,0.8, got {args.levels!r}", style="red")
        return 2
    settings = SimSettings(
        url=auth.url,
        state_root=Path(args.state_root),
        group=args.group,
        trust=Path(args.trust),
        fleet_key=Path(args.fleet_key),
        password=auth.password,
        prefix=args.prefix,
        target=args.target,
        rate_hz=args.rate,
        levels=levels,
        telemetry_interval_s=args.telemetry_interval,
        bundles=tuple(Path(b) for b in args.bundle or ()),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    sim = Simulation(settings, args.devices)
    sim.start()
    print(
        f"edgert: {args.devices} simulated devices ({args.prefix}-000..) in group {args.group} on {auth.url}",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait(args.duration or None)
    sim.stop()
    return 0


# --- parser --------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    # The controller's options are accepted before or after the fleet subcommand; `simulate` runs
    # devices, not a controller, and takes only the broker.
    options = (
        ("--broker", "broker", "mqtt[s]://[USER[:PASS]@]HOST:PORT"),
        ("--signing-key", "signing_key", "the fleet's PRIVATE key that signs control messages"),
        ("--state", "state", f"controller state file ({default_state()})"),
        ("--broker-user", "username", "broker account (default: from the URL)"),
        ("--broker-password-file", "password_file", "broker password (or EDGERT_MQTT_PASSWORD)"),
        ("--tls-ca", "tls_ca", "CA certificate for mqtts://"),
    )
    olds = (("--key", "--signing-key", "signing_key"), ("--username", "--broker-user", "username"),
            ("--password-file", "--broker-password-file", "password_file"))  # fmt: skip
    common = argparse.ArgumentParser(add_help=False)
    for flag, dest, h in options:
        common.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=h)
    for old, new, dest in olds:
        alias(common, old, new, dest, default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="stable JSON output")
    broker_only = argparse.ArgumentParser(add_help=False)
    broker_only.add_argument("--broker", default=argparse.SUPPRESS, help="mqtt[s]://[USER[:PASS]@]HOST:PORT")

    fl = sub.add_parser("fleet", help="fleet controller: devices, publish, rollouts, simulated devices")
    for flag, dest, h in options:
        fl.add_argument(flag, dest=dest, default=None, help=h)
    for old, new, dest in olds:
        alias(fl, old, new, dest)
    fl.set_defaults(json=False)
    fs = fl.add_subparsers(dest="fleet_command", required=True)

    dv = fs.add_parser("devices", parents=[common], help="what each device runs, online, last seen, health")
    dv.add_argument("--group")
    dv.set_defaults(func=cmd_devices)

    en = fs.add_parser("enroll", parents=[common], help="put a device in a group on the fleet's record")
    en.add_argument("device")
    en.add_argument("--group", required=True)
    en.set_defaults(func=cmd_enroll)

    pb = fs.add_parser("publish", parents=[common], help="verify a bundle and make it available to devices")
    pb.add_argument("bundle")
    pb.add_argument("--trust", action="append", required=True, help="public key(s) the bundle must be signed by")
    pb.add_argument("--url", help="also (or only, with --no-chunks) fetchable here: https://, S3 presigned, file://")
    pb.add_argument("--no-chunks", action="store_true", help="no retained chunks on the broker: URL only")
    pb.set_defaults(func=cmd_publish)

    ro = fs.add_parser("rollout", parents=[common], help="roll NAME:VERSION out to a group and drive it to the end")
    ro.add_argument("target", metavar="NAME:VERSION")
    ro.add_argument("--group", required=True)
    ro.add_argument("--strategy", required=True, choices=["canary", "staged", "blue-green", "shadow", "ab"])
    ro.add_argument("--steps", help="percentages: canary 10,100; staged 1,10,50,100 (defaults)")
    ro.add_argument("--min-devices", type=int, default=3, help="devices judged before an abort or a stage (3)")
    ro.add_argument("--max-failure-rate", type=float, default=0.2, help="failed share that aborts (0.2)")
    ro.add_argument("--health-window", type=float, default=30.0, help="each device's health window, s (30)")
    ro.add_argument("--min-inferences", type=int, default=20, help="inferences a window needs (20)")
    ro.add_argument("--stage-timeout", type=float, default=0.0, help="per device verdict, s (3 windows + 60)")
    ro.add_argument("--split", type=float, default=10.0, help="ab: percent of requests on the new version (10)")
    ro.add_argument("--max-error-rate", type=float, default=0.05, help="fleet error rate that aborts (0.05)")
    ro.add_argument("--max-p95-ratio", type=float, default=3.0, help="p95 new/old that fails a device (3)")
    ro.add_argument("--min-p95-increase-ms", type=float, default=0.5, help="p95 increase below this is noise (0.5)")
    ro.add_argument(
        "--unjudged",
        choices=["fail", "pass"],
        default="fail",
        help="a device with too little traffic in its window: fail it (default) or count it as a pass",
    )
    ro.add_argument("--detach", action="store_true", help="create it and return; `resume` drives it")
    ro.set_defaults(func=cmd_rollout)

    for cmd, fn, h in (
        ("status", cmd_status, "a rollout's progress, devices, figures and decisions"),
        ("resume", cmd_resume, "drive an active rollout (after a controller restart)"),
        ("abort", cmd_abort, "stop a rollout and roll moved devices back"),
        ("rollback", cmd_rollback, "put the group back on the version a rollout came from"),
        ("promote", cmd_promote, "promote a shadow or A/B candidate to every device"),
    ):
        p = fs.add_parser(cmd, parents=[common], help=h)
        p.add_argument("rollout", nargs="?", type=int, help="rollout id (default: the latest)")
        p.set_defaults(func=fn)
        if cmd == "status":
            p.add_argument("--log", type=int, default=15, help="decisions shown (15)")
        if cmd == "abort":
            p.add_argument("--reason", default="aborted by the operator")

    co = fs.add_parser("console", parents=[common], help="a live web page of the fleet, its rollouts and experiments")
    co.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (127.0.0.1; elsewhere needs --token-file)"
    )
    co.add_argument("--port", type=int, default=8090, help="port (8090; 0 picks a free one)")
    co.add_argument("--token-file", help="token or password that logs an operator in (else one is made and printed)")
    co.add_argument("--sample-period", type=float, default=2.0, help="seconds between the plots' samples (2)")
    co.set_defaults(func=cmd_console)

    sm = fs.add_parser("simulate", parents=[broker_only], help="run N simulated devices (real agents) against a broker")
    sm.add_argument("--devices", type=int, required=True)
    sm.add_argument("--state-root", required=True)
    sm.add_argument("--group", required=True)
    sm.add_argument("--trust", required=True, help="public key bundles are signed with")
    sm.add_argument("--fleet-key", required=True, help="public key desired state is signed with")
    sm.add_argument("--device-password-file", help="broker password of every simulated device account")
    sm.add_argument("--prefix", default="sim", help="device ids PREFIX-000, PREFIX-001, ... (sim)")
    sm.add_argument("--target", default="x86-cpu")
    sm.add_argument("--rate", type=float, default=10.0, help="inferences per second per device (10)")
    sm.add_argument("--levels", default="0.5", help="sensor levels, assigned round-robin (0.5)")
    sm.add_argument("--telemetry-interval", type=float, default=1.0, help="state/metrics period, s (1)")
    sm.add_argument("--bundle", action="append", help="install this bundle on first boot (else start empty)")
    sm.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: until SIGTERM)")
    sm.set_defaults(func=cmd_simulate)
