"""Host-side packer commands: `pack` and `tools` (the isolated TFLite converter environment)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_runtime.cli.console import console, fail
from edge_runtime.cli.flags import alias, require
from edge_runtime.contracts.bundle import BundleError, PreprocessSpec


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


def cmd_pack(args: argparse.Namespace) -> int:
    from edge_runtime.pack.pipeline import PackError, PackRequest, pack
    from edge_runtime.pack.report import render_report
    from edge_runtime.pack.validate import Gate

    require(args, "signing_key", "--signing-key")
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
        key=Path(args.signing_key),
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
        judge=args.judge,
        allow_slower=args.allow_slower,
        bias_correction=not args.no_bias_correction,
        smooth_activations=args.smooth_activations,
    )
    try:
        result = pack(req, console)
    except PackError as e:
        if e.report:
            keys = ("outputs", "accuracy", "gate", "npu", "latency_gate")
            console.print_json(data={k: e.report[k] for k in keys if k in e.report})
        return fail(f"edgert pack: {e}")
    except (ValueError, OSError, BundleError) as e:
        return fail(f"edgert pack: {e}")
    print(render_report(result.manifest, result.report))
    print(result.path)
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


def add_pack(sub: Any) -> None:
    from edge_runtime.contracts.targets import target_names

    pk = sub.add_parser("pack", help="quantize, validate, gate, sign and bundle a model")
    pk.add_argument("model")
    pk.add_argument("--target", required=True, choices=target_names(), help="the device class the bundle is for")
    pk.add_argument("--artifact", choices=["onnx", "tflite"], help="arm64-cpu: onnx (default) or tflite")
    pk.add_argument("--judge", choices=["auto", "host", "aarch64"], default="auto",
                    help="whose kernels judge the candidate: aarch64 under emulation (the default for ARM targets"
                    " when the arm64 root is present; EDGERT_JUDGE overrides auto) or this host's")  # fmt: skip
    pk.add_argument("--calib", required=True, help="calibration data: images, .npy or .npz")
    pk.add_argument("--eval", required=True, help="held-out evaluation data (ImageFolder layout for labels)")
    pk.add_argument("--name", required=True)
    pk.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    pk.add_argument("--signing-key", dest="signing_key", help="the PRIVATE Ed25519 key that signs the bundle"
                    " (edgert keys generate); required")  # fmt: skip
    alias(pk, "--key", "--signing-key", "signing_key")
    pk.add_argument("-o", "--out", help="output .edgepkg (default NAME-VERSION-TARGET.edgepkg)")
    pk.add_argument("--labels", help="class names, one per line (index order)")
    pk.add_argument("--precision", choices=["int8", "fp16", "fp32", "auto"], default="int8",
                    help="auto: pack each the target runs, ship the fastest that passes the gate (int8)")  # fmt: skip
    pk.add_argument("--allow-slower", action="store_true",
                    help="ship a candidate slower than fp32 (x86-cpu: refused otherwise)")  # fmt: skip
    pk.add_argument(
        "--calibration",
        choices=["auto", "mean-minmax", "minmax", "per-tensor", "entropy", "percentile"],
        default="auto",
        help="activation ranges: the mean of per-sample extremes, the extremes over all samples, per tensor the "
        "estimator with the least quantization error, entropy (KL), the 99.999th percentile; auto (default) "
        "tries the first two and keeps the closer to fp32",
    )
    pk.add_argument("--min-cosine", type=float, default=0.98, help="gate: mean cosine per output (0.98)")
    pk.add_argument("--min-top1", type=float, default=0.95, help="gate: top-1 agreement with fp32 (0.95)")
    pk.add_argument("--max-drop", type=float, default=0.02, help="gate: task accuracy drop (0.02)")
    pk.add_argument("--no-recover", action="store_true", help="do not keep sensitive layers in float")
    pk.add_argument("--no-bias-correction", action="store_true",
                    help="do not correct layer biases for the mean error quantization adds")  # fmt: skip
    pk.add_argument("--smooth-activations", dest="smooth_activations", type=float, metavar="ALPHA",
                    help="static INT8 (ONNX): move per-channel activation range into the next Conv's weights "
                    "(SmoothQuant's migration; alpha 0-1, e.g. 0.5); off by default")  # fmt: skip
    pk.add_argument("--max-calib", type=int, help="use at most this many calibration samples")
    pk.add_argument("--max-eval", type=int, help="use at most this many evaluation samples")
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


def add_tools(sub: Any) -> None:
    tools = sub.add_parser("tools", help="the isolated TFLite converter environment (TensorFlow, onnx2tf)")
    tsub = tools.add_subparsers(dest="tools_command", required=True)
    tsub.add_parser("install", help="create it now (from PyPI); pack creates it on first use otherwise")
    tsub.add_parser("path", help="print where it lives; exit 1 when it is not there yet")
    tools.set_defaults(func=cmd_tools)
