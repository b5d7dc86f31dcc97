"""A worker process: measures one row and prints its figures as one line of JSON.

Run by the command line as `python -P -m benchmarks.worker CONFIG`, where `CONFIG` is a
JSON object with `row`, `tree` (the source tree `curvzoo` must come from) and `options`.
It fails (exit status 2) before measuring anything if `curvzoo` was imported from
elsewhere.
"""

import json
import sys

from .options import Options
from .trees import check_tree, WrongTreeError


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0])
    import curvzoo

    try:
        check_tree(curvzoo.__file__, config["tree"])
    except WrongTreeError as error:
        print(f"benchmarks.worker: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from . import rows

    result = rows.measure(config["row"], Options.from_json(config["options"]))
    result["curvzoo_file"] = curvzoo.__file__
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
