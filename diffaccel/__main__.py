"""python -m diffaccel info | demo"""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffaccel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, GPU, and which backend each op will use")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        import diffaccel

        d = diffaccel.info()
        print(json.dumps(d, indent=2) if args.json else diffaccel._info.format_info(d))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
