#!/usr/bin/env python3
"""Summarise a ctest run per label: passed / failed / skipped.

usage: summarize_ctest.py tests.json junit.xml
  tests.json  from `ctest --show-only=json-v1` (test names and labels)
  junit.xml   from `ctest --output-junit` (each test's status)
"""
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def main(tests_json, junit_xml):
    labels = {}
    for t in json.load(open(tests_json))["tests"]:
        props = {p["name"]: p["value"] for p in t.get("properties", [])}
        labels[t["name"]] = props.get("LABELS", [])
    counts = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    failed = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = case.get("name")
        status = case.get("status", "run")
        if case.find("failure") is not None or case.find("error") is not None or status == "fail":
            kind = "failed"
            failed.append(name)
        elif case.find("skipped") is not None or status in ("notrun", "disabled", "skipped"):
            kind = "skipped"
        else:
            kind = "passed"
        for label in labels.get(name, []) + ["all"]:
            counts[label][kind] += 1
    print(f"{'label':<16}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for label in sorted(counts, key=lambda l: (l == "all", l)):
        c = counts[label]
        print(f"{label:<16}{c['passed']:>8}{c['failed']:>8}{c['skipped']:>9}")
    for name in failed:
        print(f"FAILED: {name}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
