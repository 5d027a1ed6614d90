"""``python -m llmworker.openapi``: the document of a worker on its defaults (no keys, the
built-in kinds), as JSON on standard output: what the TypeScript client's types are
generated from (clients/typescript, ``npm run generate``)."""

from __future__ import annotations

import sys

import orjson

from llmworker.openapi import document
from llmworker.settings import load_settings


def main() -> None:
    settings = load_settings({}, env_file=None)
    sys.stdout.write(orjson.dumps(document(settings), option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
