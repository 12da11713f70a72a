"""`python -m tflite_export …`: export a checkpoint for phones, or look inside an export.

    plan    --checkpoint CKPT [--vocab V] [--config C] [--batch-size 16] [--clip-norm C]
            [--model-version N] --out DIR
    app     --checkpoint CKPT [--vocab V] [--config C] [--k 3] [--model-version N] --out DIR
    inspect FILE     (a .tflite or a manifest: size, ops, signatures)
    verify  MANIFEST (check hashes, schema and vocabulary as a phone would)

Bad input (a missing file, a flag out of range, a checkpoint that does not fit
its config) ends with a one-line message naming it and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from contract.cli import ArgumentParser, UsageError, at_least, positive_float, run

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_export(args) -> int:
    """Export a plan or an app model; exit status 1 if the exporter cannot make a usable one."""
    from tflite_export.errors import ExportError
    from tflite_export.export import export_app_model, export_plan, read_checkpoint

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    inputs = read_checkpoint(args.checkpoint, args.vocab, args.config)
    version = inputs.model_version if args.model_version is None else args.model_version
    start = time.monotonic()
    try:
        if args.command == "plan":
            path = export_plan(inputs.config, inputs.flat, inputs.vocab, args.out,
                               batch_size=args.batch_size, model_version=version,
                               clip_norm=args.clip_norm, personal_layers=args.personal_layers)
        else:
            path = export_app_model(inputs.config, inputs.flat, inputs.vocab, args.out, k=args.k,
                                    model_version=version, quantize=not args.float, privacy=args.privacy)
    except ExportError as e:    # not the user's input: the converter's (exit 1, not 2)
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    _print_summary(path, time.monotonic() - start)
    return 0


def _print_summary(manifest_path: Path, seconds: float) -> None:
    from contract.artifacts.manifest import read_manifest

    m = read_manifest(manifest_path)
    size = m.files[m.artifact]["bytes"]
    print(f"{m.kind} v{m.model_version}: {manifest_path.parent / m.artifact} "
          f"({size / 1e6:.2f} MB, {len(m.ops)} op types, built-ins only) in {seconds:.1f} s")
    print(f"manifest: {manifest_path}")


def cmd_inspect(args) -> None:
    from contract.artifacts.manifest import read_manifest
    from tflite_export.modelinfo import describe

    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"inspect: no file at {path}")
    if path.suffix == ".json":
        path = path.parent / read_manifest(path).artifact
        if not path.is_file():
            raise UsageError(f"inspect: the manifest's model {path} does not exist")
    try:
        info = describe(path.read_bytes())
    except Exception as e:  # flatbuffers/LiteRT raise assorted errors on non-models
        raise UsageError(f"inspect: {path} is not a .tflite model ({e})") from None
    print(json.dumps({"file": str(path), **info}, indent=2))


def cmd_verify(args) -> None:
    from contract.artifacts.manifest import load_verified

    verified = load_verified(args.manifest)
    m = verified.manifest
    print(f"ok: {m.kind} v{m.model_version}, {len(m.files)} files match their sha256, "
          f"vocabulary {m.vocab_sha256[:12]}… ({len(verified.vocab)} tokens)")


def _privacy(text: str) -> dict:
    import json
    import math

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError("is not JSON") from None
    if not (isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) and not isinstance(
            value.get(k), bool) and math.isfinite(value[k]) and value[k] >= 0 for k in ("epsilon", "delta"))):
        raise argparse.ArgumentTypeError('must be a JSON object with finite "epsilon" and "delta" >= 0')
    return value


def _names(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one weight")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tflite_export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint")
    common.add_argument("--vocab", help="vocabulary JSON (default: vocab.json beside the "
                                        "checkpoint or in its parent directory)")
    common.add_argument("--config", choices=["gboard", "tiny"],
                        help="model config, if the checkpoint's metadata has none")
    common.add_argument("--model-version", type=at_least(0),
                        help="version recorded in the manifest (default: the checkpoint's round)")
    common.add_argument("--out", required=True, help="output directory")

    plan = sub.add_parser("plan", parents=[common], help="export the on-device training plan")
    plan.add_argument("--batch-size", type=at_least(1), default=16,
                      help="fixed training batch (short batches are padded)")
    plan.add_argument("--clip-norm", type=positive_float, default=None,
                      help="clip each step's gradient to this global L2 norm (default: none)")
    plan.add_argument("--personal-layers", type=_names, default=None,
                      help="comma-separated weight names a phone's personalization trains, e.g. "
                           "output_bias,cifg/projection (default: all)")
    plan.set_defaults(func=cmd_export)
    app = sub.add_parser("app", parents=[common], help="export the quantized suggestion model")
    app.add_argument("--k", type=at_least(1), default=3, help="suggestions per call")
    app.add_argument("--float", action="store_true", help="keep float weights (no quantization)")
    app.add_argument("--privacy", type=_privacy, default=None,
                     help='the weights\' DP guarantee for the manifest, as JSON: {"epsilon": e, "delta": d, ...}')
    app.set_defaults(func=cmd_export)
    ins = sub.add_parser("inspect", help="size, ops and signatures of a .tflite or manifest")
    ins.add_argument("file")
    ins.set_defaults(func=cmd_inspect)
    ver = sub.add_parser("verify", help="check a manifest's files as the device does")
    ver.add_argument("manifest")
    ver.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    from contract.artifacts.errors import ArtifactError

    # the exporter and the manifest reader name the flag or file at fault in their ValueErrors
    return run(build_parser(), argv, user_errors=(ValueError, ArtifactError))


if __name__ == "__main__":
    sys.exit(main())
