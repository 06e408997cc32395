"""Bundle and key commands, needed on both sides: `keys generate`, `verify`, `inspect`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_runtime.cli.console import console, fail
from edge_runtime.cli.flags import alias, require
from edge_runtime.contracts.bundle import BundleError, generate_keypair, load_public_keys, peek_manifest, read_bundle


def cmd_keys(args: argparse.Namespace) -> int:
    priv, pub = generate_keypair(Path(args.out), force=args.force)
    console.print(f"wrote {priv} (private, mode 0600) and {pub}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    require(args, "trust", "--trust")
    try:
        keys = load_public_keys(args.trust)
    except BundleError as e:  # the key is the problem, not the bundle
        return fail(f"edgert verify: {e}")
    try:
        bundle = read_bundle(Path(args.bundle), keys)
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
        if args.trust:
            bundle = read_bundle(path, load_public_keys(args.trust))
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
        # One verdict: a target that runs a converted artifact (npu: TFLite ops after onnx2tf) can only
        # be judged after the conversion `edgert pack` does; saying [] here would promise what pack refuses.
        "unsupported": {
            name: t.unsupported(ops) if "onnx" in t.all_artifacts else "judged after conversion (edgert pack)"
            for name, t in targets().items()
        },
    }
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def add_keys(sub: Any) -> None:
    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    gen = keys.add_parser("generate", help="write DIR/signing.key (0600) and DIR/signing.pub")
    gen.add_argument("--out", required=True, help="the folder to write the key pair into")
    gen.add_argument("--force", action="store_true", help="replace a key pair already in the folder")
    gen.set_defaults(func=cmd_keys)


def add_verify(sub: Any) -> None:
    vf = sub.add_parser("verify", help="exit 0 only for an intact bundle signed by a trusted key")
    vf.add_argument("bundle")
    vf.add_argument(
        "--trust", action="append", help="PUBLIC key (file, or folder of *.pub) to trust; repeatable; required"
    )
    alias(vf, "--key", "--trust", "trust", append=True)
    vf.set_defaults(func=cmd_verify)


def add_inspect(sub: Any) -> None:
    ins = sub.add_parser("inspect", help="show a bundle's manifest and report, or an ONNX model's ops")
    ins.add_argument("path")
    ins.add_argument("--trust", action="append", help="verify the signature with this PUBLIC key")
    alias(ins, "--key", "--trust", "trust", append=True)
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)
