"""Compare two run.sh output folders: the cases that fail only with LaBERSampler, grouped by message.

python tools/torchrl_rb_check/summarize.py OUT_BASELINE OUT_LABER
"""

import collections
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(folder: Path) -> dict[str, tuple[str, str]]:
    cases = {}
    for xml in folder.glob("*.xml"):
        for case in ET.parse(xml).iter("testcase"):
            status, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    status, message = child.tag, (child.get("message") or "").splitlines()[0][:150]
            cases[f"{case.get('classname')}::{case.get('name')}"] = (status, message)
    return cases


def main(baseline: str, laber: str) -> None:
    base, ours = outcomes(Path(baseline)), outcomes(Path(laber))
    print("baseline:", dict(collections.Counter(s for s, _ in base.values())))
    print("laber:   ", dict(collections.Counter(s for s, _ in ours.values())))
    only = {
        case: message
        for case, (status, message) in ours.items()
        if status in ("failure", "error") and base.get(case, ("passed",))[0] not in ("failure", "error")
    }
    print(f"failing only with LaBERSampler: {len(only)}")
    for message, count in collections.Counter(only.values()).most_common():
        example = next(case for case, m in only.items() if m == message)
        print(f"{count:5d}  {message}\n       e.g. {example}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
