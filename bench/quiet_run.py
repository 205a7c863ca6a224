"""Run a benchmark command once the machine is quiet, and add the load averages to the JSON it wrote.

For benchmarks whose own interface this project keeps fixed (e.g. `bench/model_speed.py`):

    python -m bench.quiet_run --json bench/results/model_speed_cpu.json -- \\
        python -m bench.model_speed --out bench/results/model_speed_cpu.json

waits until the 1-minute load average is below the threshold (as `bench.quiet.wait_for_quiet`), runs the command,
and writes {"load_before", "waited_s", "quiet", "load_after"} under the key "load_average" of `--json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from bench.quiet import add_quiet_arguments, load_average, wait_for_quiet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wait for a quiet machine, run, record load averages.")
    parser.add_argument("--json", type=Path, required=True, help="the result file the command writes")
    add_quiet_arguments(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if args.no_quiet_wait:
        record = {"load_before": round(load_average(), 2), "waited_s": 0, "quiet": None}
    else:
        record = wait_for_quiet(args.quiet_threshold, args.quiet_poll, args.quiet_max_wait)
    code = subprocess.run(command, check=False).returncode
    record["load_after"] = round(load_average(), 2)
    if code == 0 and args.json.is_file():
        data = json.loads(args.json.read_text())
        data["load_average"] = record
        args.json.write_text(json.dumps(data, indent=1))
    logging.info("exit %d, load averages %s", code, record)
    return code


if __name__ == "__main__":
    sys.exit(main())
