"""``python -m raymtl.data``: convert a data set to Parquet shards, or verify a conversion."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from raymtl.cli import OneLineArgumentParser, parse_data_options, positive_int, run_main
from raymtl.data.base import DATASETS
from raymtl.data.convert import convert, verify

PROG = "python -m raymtl.data"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen subcommand."""
    parser = OneLineArgumentParser(prog=PROG, description=__doc__)
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=OneLineArgumentParser
    )
    c = commands.add_parser(
        "convert",
        help="write Parquet shards (encoded bytes + labels + id + split); resumes if interrupted",
    )
    c.add_argument(
        "--dataset",
        required=True,
        help=f"one of: {', '.join(n for n in DATASETS.names() if not n.startswith('synthetic'))}",
    )
    c.add_argument("--root", required=True, help="the data set as distributed (path or URI)")
    c.add_argument("--out", required=True, help="output folder (path or URI)")
    c.add_argument(
        "--shard-size", type=positive_int, default=2000, help="samples per shard (default: 2000)"
    )
    c.add_argument(
        "--on-bad-sample",
        choices=["error", "skip"],
        default="error",
        help="stop at the first unreadable sample, or skip and count (default: error)",
    )
    c.add_argument(
        "--threads", type=positive_int, default=4, help="reader/decoder threads (default: 4)"
    )
    c.add_argument(
        "--data-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data set option, e.g. attributes=Smiling,Male (repeatable)",
    )
    v = commands.add_parser("verify", help="check a finished conversion's shard checksums")
    v.add_argument("out", help="the converted folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "verify":
        print(f"{args.out}: {verify(args.out)} samples, all shard checksums match")
        return 0
    report = convert(
        args.dataset,
        args.root,
        args.out,
        args.shard_size,
        args.on_bad_sample,
        args.threads,
        **parse_data_options(args.data_option),
    )
    print(
        f"wrote {report.rows} samples in {report.shards} shards to {report.out} ({report.resumed_shards} shards reused from an earlier run, {report.skipped} bad samples skipped)"
    )
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
