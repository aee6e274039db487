"""`ldae info`: what a checkpoint, run directory or timm export folder is (model/describe.py), as tables or JSON."""

from __future__ import annotations

import json

from ldae_cli.model.describe import describe_checkpoint, render
from ldae_cli.runs.logs import console


def main(path: str, as_json: bool = False) -> dict:
    info = describe_checkpoint(path)
    if as_json:
        print(json.dumps(info, indent=1))  # plain stdout, no rich markup: for jq and scripts
    else:
        console.print(render(info))
    return info
