"""python -m diffaccel info | demo"""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffaccel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, GPU, and which backend each op will use")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_demo = sub.add_parser("demo", help="the reference digits model: full precision vs calibrated + patched")
    p_demo.add_argument("--out-dir", default=".", help="where diffaccel_demo.png is written")
    p_demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p_demo.add_argument("--method", default="minmax", choices=["minmax", "qdiffusion", "tfmq", "mixdq"],
                        help="calibration method of the W8A8 recipe")
    args = parser.parse_args(argv)  # (unknown options are errors: a misspelt --out-dir must not be dropped)
    if args.command == "info":
        import diffaccel

        d = diffaccel.info()
        print(json.dumps(d, indent=2) if args.json else diffaccel._info.format_info(d))
        return 0
    if args.command == "demo":
        from diffaccel._demo import run_demo

        run_demo(out_dir=args.out_dir, device=args.device, method=args.method)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
