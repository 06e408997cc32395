"""`edgert`: the command line. A thin layer that parses arguments and calls the library.

Exit codes: 0 success, 1 a refusal or failure the message explains (bad bundle, failed
gate), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from edge_runtime.contracts.bundle import (
    BundleError,
    PreprocessSpec,
    generate_keypair,
    load_public_keys,
    peek_manifest,
    read_bundle,
)

console = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> int:
    """Print a refusal (user data: no rich markup) and return the failure exit code."""
    console.print(message, style="red", markup=False)
    return 1


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} expects {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} expects {n} comma-separated numbers, got {text!r}")
    return values


def preprocess_from_args(args: argparse.Namespace) -> PreprocessSpec | None:
    fields: dict[str, Any] = {}
    if args.preprocess:
        try:
            fields = json.loads(Path(args.preprocess).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"edgert: cannot read --preprocess {args.preprocess}: {e}") from e
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise SystemExit(f"edgert: --size expects WxH such as 224x224, got {args.size!r}") from None
        fields["size"] = (w, h)
    for key in ("resize", "resize_short", "interpolation", "layout", "color", "scale"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    if args.mean:
        fields["mean"] = _floats(args.mean, 3, "--mean")
    if args.std:
        fields["std"] = _floats(args.std, 3, "--std")
    if not fields:
        return None
    try:
        return PreprocessSpec.model_validate(fields)
    except Exception as e:
        raise SystemExit(f"edgert: invalid preprocessing: {e}") from e


def cmd_keys(args: argparse.Namespace) -> int:
    priv, pub = generate_keypair(Path(args.out))
    console.print(f"wrote {priv} (private, mode 0600) and {pub}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from edge_runtime.pack.pipeline import PackError, PackRequest, pack
    from edge_runtime.pack.report import render_report
    from edge_runtime.pack.validate import Gate

    labels = None
    if args.labels:
        labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
    req = PackRequest(
        model=Path(args.model),
        target=args.target,
        calib=Path(args.calib),
        eval=Path(args.eval),
        name=args.name,
        version=args.version,
        key=Path(args.key),
        out=Path(args.out) if args.out else None,
        preprocess=preprocess_from_args(args),
        labels=labels,
        precision=args.precision,
        calibration=args.calibration,
        gate=Gate(args.min_cosine, args.min_top1, args.max_drop),
        recover=not args.no_recover,
        max_calib=args.max_calib,
        max_eval=args.max_eval,
        stateful=args.stateful,
        artifact=args.artifact,
    )
    try:
        result = pack(req, console)
    except PackError as e:
        if e.report:
            console.print_json(data={k: e.report[k] for k in ("outputs", "accuracy", "gate", "npu") if k in e.report})
        return fail(f"edgert pack: {e}")
    except (ValueError, OSError, BundleError) as e:
        return fail(f"edgert pack: {e}")
    print(render_report(result.manifest, result.report))
    print(result.path)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        bundle = read_bundle(Path(args.bundle), load_public_keys(args.key))
    except BundleError as e:
        return fail(f"REFUSED {args.bundle}: {e}")
    m = bundle.manifest
    console.print(f"OK {args.bundle}: {m.name} {m.version} for {m.target}, signed by key {bundle.signer}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.suffix == ".onnx":
        return _inspect_onnx(path, args.json)
    if path.suffix == ".tflite":
        return _inspect_tflite(path, args.json)
    verified = False
    try:
        if args.key:
            bundle = read_bundle(path, load_public_keys(args.key))
            manifest, verified = bundle.manifest, True
            report = bundle.files.get("report.md", b"").decode()
        else:
            manifest, report = peek_manifest(path), ""
    except BundleError as e:
        return fail(f"edgert inspect: {e}")
    if args.json:
        out = {
            "verified": verified,
            "manifest": manifest.model_dump(mode="json"),
            "report": manifest.validation,
        }
        print(json.dumps(out, indent=2))
        return 0
    if not verified:
        console.print("[yellow]signature NOT verified (pass --key PUB to verify)[/yellow]")
    print(report or json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0


def _inspect_tflite(path: Path, as_json: bool) -> int:
    from edge_runtime.pack.targets import get_target
    from edge_runtime.pack.tflite_inspect import describe, npu_problems, render

    try:
        desc = describe(path.read_bytes())
    except (ValueError, RuntimeError, OSError) as e:
        return fail(f"edgert inspect: {path} is not a TFLite model LiteRT can read: {e}")
    problems = npu_problems(desc, get_target("npu"))
    if as_json:
        print(json.dumps({**desc, "tensors": list(desc["tensors"].values()), "npu_problems": problems}, indent=1))
        return 0
    print(render(desc))
    print(f"npu profile: {'ok' if not problems else f'{len(problems)} problems'}")
    for line in problems[:20]:
        print(f"  {line}")
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    from edge_runtime.pack import toolenv

    if args.tools_command == "path":
        print(toolenv.env_path())
        return 0 if toolenv.ready() else 1
    try:
        print(toolenv.ensure(lambda m: console.print(m, markup=False)))
    except toolenv.ToolEnvError as e:
        return fail(str(e))
    return 0


def _inspect_onnx(path: Path, as_json: bool) -> int:
    from edge_runtime.pack.prepare import PrepareError, graph_inputs, load_checked, op_histogram, tensor_specs
    from edge_runtime.pack.targets import targets

    try:
        model = load_checked(path)
    except PrepareError as e:
        return fail(f"edgert inspect: {e}")
    ops = op_histogram(model)
    out = {
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "inputs": [t.model_dump() for t in tensor_specs(graph_inputs(model))],
        "outputs": [t.model_dump() for t in tensor_specs(model.graph.output)],
        "ops": ops,
        "unsupported": {name: t.unsupported(ops) for name, t in targets().items()},
    }
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from edge_runtime.serving.store import ModelStore

    store = ModelStore(Path(args.state_dir))
    try:
        for pub in args.trust or []:
            store.trust(Path(pub))
        bundle = store.install(Path(args.bundle))
    except (BundleError, OSError) as e:
        return fail(f"REFUSED {args.bundle}: {e}")
    m = bundle.manifest
    console.print(f"installed {m.name} {m.version} ({m.target}) into {store.root}; active")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_runtime.device.config import ConfigError, load_config
    from edge_runtime.device.daemon import Daemon

    overrides = {
        "state_dir": args.state_dir,
        "host": args.host,
        "port": args.port,
        "uds": args.uds,
        "threads": args.threads,
        "delegate": args.delegate,
        "batching.max_batch": args.max_batch,
        "batching.max_delay_ms": args.max_delay_ms,
        "target": args.target,
    }
    if args.mqtt:
        overrides.update({
            "mqtt.url": args.mqtt, "mqtt.device_id": args.device_id, "mqtt.group": args.group,
            "mqtt.fleet_key": args.fleet_key, "mqtt.username": args.mqtt_user,
            "mqtt.password_file": args.mqtt_password_file, "mqtt.tls_ca": args.tls_ca,
            "mqtt.tls_cert": args.tls_cert, "mqtt.tls_key": args.tls_key,
            "mqtt.telemetry_interval_s": args.telemetry_interval,
        })  # fmt: skip
    try:
        config = load_config(Path(args.config) if args.config else None, overrides)
        daemon = Daemon(config)
    except (ConfigError, OSError, BundleError) as e:
        return fail(f"edgert serve: {e}")
    try:
        return daemon.run()
    except (BundleError, RuntimeError, ValueError) as e:
        return fail(f"edgert serve: cannot load models: {e}")


def cmd_infer(args: argparse.Namespace) -> int:
    from edge_runtime.device.offline_scoring import run_batch
    from edge_runtime.serving.batcher import BatchSettings
    from edge_runtime.serving.runtime import Runtime

    try:
        runtime = Runtime(
            load_public_keys(args.key), threads=args.threads, batching=BatchSettings(max_batch=args.batch)
        )
        handle = runtime.load(Path(args.bundle))
        n = run_batch(runtime, handle.name, Path(args.input), Path(args.out), Path(args.csv) if args.csv else None)
    except (BundleError, ValueError, OSError) as e:
        return fail(f"edgert infer: {e}")
    console.print(f"scored {n} new items into {args.out}")
    runtime.close()
    return 0


def cmd_device_image(args: argparse.Namespace) -> int:
    from edge_runtime.flash.rootfs import DEFAULT_CONFIG, DEFAULT_UNIT, ImageError, build_image

    try:
        config = Path(args.config).read_text() if args.config else DEFAULT_CONFIG
        index = build_image(
            Path(args.out), Path(args.binary), [Path(b) for b in args.bundle], [Path(k) for k in args.trust],
            Path(args.unit) if args.unit else DEFAULT_UNIT, config,
        )  # fmt: skip
    except (ImageError, BundleError, OSError) as e:
        return fail(f"edgert device-image: {e}")
    console.print(f"wrote {args.out}: {len(index)} files")
    return 0


def cmd_device_install(args: argparse.Namespace) -> int:
    from edge_runtime.flash.rootfs import ImageError, install_image

    try:
        report = install_image(Path(args.image), Path(args.root))
    except (ImageError, BundleError, OSError) as e:
        return fail(f"edgert device-install: {e}")
    console.print(
        f"installed into {args.root}: {len(report.written)} written, {len(report.unchanged)} unchanged, "
        f"kept local {report.kept or 'none'}, seeded {report.seeded or 'none'}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from edge_runtime.device.agent.outbox import Outbox
    from edge_runtime.device.agent.session import device_state
    from edge_runtime.serving.store import ModelStore

    root = Path(args.state_dir)
    if not root.is_dir():
        return fail(f"edgert status: {root} is not a state directory")
    store = ModelStore(root)
    outbox = (
        Outbox(root / "outbox.db").stats() if (root / "outbox.db").exists() else {"depth": 0, "bytes": 0, "dropped": 0}
    )
    counters = root / "agent" / "counters.json"
    refused = json.loads(counters.read_text()) if counters.exists() else {}
    seqs = root / "agent" / "control-seq.json"
    state = device_state(store, outbox, refused, "", "", "", json.loads(seqs.read_text()) if seqs.exists() else {})
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        for name, m in state["models"].items():
            print(
                f"{name}: active {m['version']}, staged {m['staged'] or '-'}"
                + (" (update pending)" if m["pending"] else "")
            )
        o = state["outbox"]
        print(f"outbox: {o['depth']} records, {o['bytes']} bytes, {o['dropped']} dropped")
        print(f"last rollback: {state['last_rollback'] or 'none'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_runtime.cli.demo import run_demo

    return run_demo(Path(args.workdir), console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgert", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = p.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="write DIR/signing.key (0600) and DIR/signing.pub")
    gen.add_argument("--out", required=True)
    gen.set_defaults(func=cmd_keys)

    pk = sub.add_parser("pack", help="quantize, validate, gate, sign and bundle a model")
    pk.add_argument("model")
    pk.add_argument("--target", required=True, help="x86-cpu | arm64-cpu | jetson-gpu | npu")
    pk.add_argument("--artifact", choices=["onnx", "tflite"], help="arm64-cpu: onnx (default) or tflite")
    pk.add_argument("--calib", required=True, help="calibration data: images, .npy or .npz")
    pk.add_argument("--eval", required=True, help="held-out evaluation data (ImageFolder layout for labels)")
    pk.add_argument("--name", required=True)
    pk.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    pk.add_argument("--key", required=True, help="Ed25519 private key (edgert keys generate)")
    pk.add_argument("-o", "--out", help="output .edgepkg (default NAME-VERSION-TARGET.edgepkg)")
    pk.add_argument("--labels", help="class names, one per line (index order)")
    pk.add_argument("--precision", choices=["int8", "fp16", "fp32"], default="int8")
    pk.add_argument("--calibration", choices=["minmax", "entropy", "percentile"], default="minmax")
    pk.add_argument("--min-cosine", type=float, default=0.98, help="gate: mean cosine per output (0.98)")
    pk.add_argument("--min-top1", type=float, default=0.95, help="gate: top-1 agreement with fp32 (0.95)")
    pk.add_argument("--max-drop", type=float, default=0.02, help="gate: task accuracy drop (0.02)")
    pk.add_argument("--no-recover", action="store_true", help="do not keep sensitive layers in float")
    pk.add_argument("--max-calib", type=int)
    pk.add_argument("--max-eval", type=int)
    pk.add_argument("--stateful", action="store_true", help="never batch requests of this model")
    pre = pk.add_argument_group("preprocessing (or --preprocess FILE.json with the same fields)")
    pre.add_argument("--preprocess")
    pre.add_argument("--size", help="WxH")
    pre.add_argument("--resize", choices=["stretch", "letterbox", "pad", "center_crop"])
    pre.add_argument("--resize-short", dest="resize_short", type=int)
    pre.add_argument("--interpolation", choices=["linear", "area", "cubic", "lanczos", "nearest"])
    pre.add_argument("--layout", choices=["nchw", "nhwc"])
    pre.add_argument("--color", choices=["rgb", "bgr"])
    pre.add_argument("--scale", type=float)
    pre.add_argument("--mean", help="A,B,C")
    pre.add_argument("--std", help="A,B,C")
    pk.set_defaults(func=cmd_pack)

    vf = sub.add_parser("verify", help="exit 0 only for an intact bundle signed by a trusted key")
    vf.add_argument("bundle")
    vf.add_argument("--key", required=True, action="append", help="trusted public key (file or dir); repeatable")
    vf.set_defaults(func=cmd_verify)

    ins = sub.add_parser("inspect", help="show a bundle's manifest and report, or an ONNX model's ops")
    ins.add_argument("path")
    ins.add_argument("--key", action="append", help="verify the signature with this public key")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    inst = sub.add_parser("install", help="verify a bundle and make it the active version in a state dir")
    inst.add_argument("bundle")
    inst.add_argument("--state-dir", required=True)
    inst.add_argument("--trust", action="append", help="public key to trust (copied into STATE/keys)")
    inst.set_defaults(func=cmd_install)

    sv = sub.add_parser("serve", help="the on-device daemon (Open Inference Protocol v2 over HTTP)")
    sv.add_argument("--config", help="YAML config (unknown keys are errors)")
    sv.add_argument("--state-dir")
    sv.add_argument("--host", help="default 127.0.0.1")
    sv.add_argument("--port", type=int, help="default 8000")
    sv.add_argument("--uds", help="also serve on this unix socket")
    sv.add_argument("--threads", type=int, help="intra-op threads per model")
    sv.add_argument("--delegate", help="LiteRT external delegate library (NPU); falls back to XNNPACK if absent")
    sv.add_argument("--max-batch", type=int, help="override every model's max batch")
    sv.add_argument("--max-delay-ms", type=float, help="override every model's max queue delay")
    sv.add_argument("--target", help="this device's target (default from the CPU architecture)")
    fl = sv.add_argument_group("fleet (MQTT); without --mqtt the daemon is fully offline")
    fl.add_argument("--mqtt", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    fl.add_argument("--device-id")
    fl.add_argument("--group")
    fl.add_argument("--fleet-key", help="public key that signs desired state")
    fl.add_argument("--mqtt-user")
    fl.add_argument("--mqtt-password-file")
    fl.add_argument("--tls-ca")
    fl.add_argument("--tls-cert")
    fl.add_argument("--tls-key")
    fl.add_argument("--telemetry-interval", type=float)
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="versions, outbox and rollbacks of a state dir (no daemon needed)")
    st.add_argument("--state-dir", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    inf = sub.add_parser("infer", help="score an image folder, video or .npy folder offline (resumable)")
    inf.add_argument("bundle")
    inf.add_argument("input")
    inf.add_argument("-o", "--out", required=True, help="JSON lines output; re-running resumes it")
    inf.add_argument("--csv", help="also write a CSV summary here")
    inf.add_argument("--key", required=True, action="append", help="trusted public key")
    inf.add_argument("--batch", type=int, default=16)
    inf.add_argument("--threads", type=int, default=0)
    inf.set_defaults(func=cmd_infer)

    img = sub.add_parser("device-image", help="write a root-filesystem tarball: binary, unit, config, keys, bundles")
    img.add_argument("-o", "--out", required=True)
    img.add_argument("--binary", required=True, help="the single binary (packaging/build-binary.sh)")
    img.add_argument("--bundle", action="append", default=[], help="initial bundle; repeatable")
    img.add_argument("--trust", action="append", required=True, help="trusted public key (file or dir)")
    img.add_argument("--unit", help="systemd unit (default: systemd/edgert.service)")
    img.add_argument("--config", help="default edgert.yaml")
    img.set_defaults(func=cmd_device_image)

    dins = sub.add_parser("device-install", help="lay a device image into a root directory (idempotent)")
    dins.add_argument("image")
    dins.add_argument("--root", required=True, help="target root file system, e.g. a mounted image")
    dins.set_defaults(func=cmd_device_install)

    tools = sub.add_parser("tools", help="the isolated TFLite converter environment (TensorFlow, onnx2tf)")
    tsub = tools.add_subparsers(dest="tools_command", required=True)
    tsub.add_parser("install", help="create it now (from PyPI); pack creates it on first use otherwise")
    tsub.add_parser("path", help="print where it lives; exit 1 when it is not there yet")
    tools.set_defaults(func=cmd_tools)

    from edge_runtime.fleet.cli import add_parser as add_fleet_parser

    add_fleet_parser(sub)

    demo = sub.add_parser("demo", help="fetch a real model, pack it, verify, load and run it")
    demo.add_argument("--workdir", default="out/demo")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {"onnx", "edge_runtime", "sympy", "matplotlib", "tensorflow"}:
            return fail(
                f"edgert {args.command}: this build lacks {e.name} (the device binary has no host tools); "
                "install the host package: pip install 'edge-runtime[pack]'"
            )
        raise


if __name__ == "__main__":
    sys.exit(main())
