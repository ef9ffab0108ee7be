#!/usr/bin/env python3
"""Summarise one or more `bazel test --build_event_json_file=BEP ...` runs
(e.g. the normal and the ASan+UBSan suite) plus optional JUnit XML files (the
fuzz run, tools/fuzz.sh --junit) as one line:
    N passed, N failed, N skipped
Each BEP is counted on its own and the counts are summed, so a target that ran
in two phases counts in both.
Counts GoogleTest cases from each test target's test.xml as listed in the BEP
of *this* invocation (stale bazel-testlogs are never read). A test target
without a usable test.xml counts as one case; a test target that produced no
result counts as one failed case if it failed to build or was aborted, and as
one skipped case if Bazel filtered it out (tag filters, e.g. the GPU tests). A
--bazel-exit-code N after a BEP is that run's exit code: non-zero with no failed
case in that BEP adds one failure, so a red phase never hides behind another
(e.g. a non-test target failed to build).
A --junit FILE that is missing or unreadable counts as one failure.
Usage: bazel_test_summary.py BEP.json [BEP.json...] [--junit FILE]... [--per-target]
       (each BEP may be followed by --bazel-exit-code N)
"""
import json
import sys
import urllib.parse
import xml.etree.ElementTree as ET


def uri_to_path(uri):
    return urllib.parse.unquote(urllib.parse.urlparse(uri).path)


def count_xml(path):
    """(passed, failed, skipped) from a JUnit/GoogleTest XML, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    p = f = s = 0
    for tc in root.iter("testcase"):
        if tc.find("failure") is not None or tc.find("error") is not None:
            f += 1
        elif (tc.find("skipped") is not None or tc.get("result") == "skipped"
              or tc.get("status") == "notrun"):
            s += 1
        else:
            p += 1
    return (p, f, s) if (p + f + s) else None


def read_events(path):
    try:
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
    except OSError:
        return


def count_bep(bep, per_target):
    """(passed, failed, skipped) of one BEP file."""
    results = {}    # label -> {(run, shard): (status, xml_path)}; last attempt wins
    statuses = {}   # label -> overallStatus / abort reason
    test_labels = set()
    for ev in read_events(bep):
        eid = ev.get("id", {})
        if "testResult" in eid:
            label = eid["testResult"]["label"]
            tr = ev.get("testResult", {})
            xml = next((uri_to_path(o["uri"]) for o in tr.get("testActionOutput", [])
                        if o.get("name") == "test.xml"), None)
            key = (eid["testResult"].get("run", 1), eid["testResult"].get("shard", 1))
            results.setdefault(label, {})[key] = (tr.get("status", "NO_STATUS"), xml)
            test_labels.add(label)
        elif "testSummary" in eid:
            label = eid["testSummary"]["label"]
            statuses[label] = ev.get("testSummary", {}).get("overallStatus", "NO_STATUS")
            test_labels.add(label)
        elif "targetConfigured" in eid and ev.get("configured", {}).get("testSize"):
            test_labels.add(eid["targetConfigured"]["label"])
        elif ("targetCompleted" in eid or "targetConfigured" in eid) and "aborted" in ev:
            label = (eid.get("targetCompleted") or eid.get("targetConfigured"))["label"]
            statuses.setdefault(label, ev["aborted"].get("reason", "ABORTED"))
        elif "targetCompleted" in eid and ev.get("completed", {}).get("success") is False:
            statuses.setdefault(eid["targetCompleted"]["label"], "FAILED_TO_BUILD")

    P = F = S = 0
    for label in sorted(test_labels):
        runs = results.get(label, {})
        if not runs:
            # A test target that never ran: skipped when Bazel filtered it out
            # (e.g. --test_tag_filters=-gpu: no result, no summary, no build
            # failure); failed when it did not build or was aborted.
            if label in statuses:
                F += 1
            else:
                S += 1
            if per_target:
                print(f"{label}: {statuses.get(label, 'NO_STATUS')} (no result)", file=sys.stderr)
            continue
        for status, xml in runs.values():
            c = count_xml(xml) if xml else None
            if c is None:
                c = (1, 0, 0) if status in ("PASSED", "FLAKY") else (0, 1, 0)
            elif status not in ("PASSED", "FLAKY") and c[1] == 0:
                c = (c[0], 1, c[2])  # crashed/timed out after writing its XML
            P, F, S = P + c[0], F + c[1], S + c[2]
            if per_target:
                print(f"{label}: {status} {c}", file=sys.stderr)
    return P, F, S


def main():
    args = sys.argv[1:]
    per_target = "--per-target" in args
    beps, junits = [], []   # beps: [path, bazel exit code]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--per-target":
            pass
        elif a == "--junit" and i + 1 < len(args):
            junits.append(args[i + 1])
            i += 1
        elif a == "--bazel-exit-code" and i + 1 < len(args):
            if beps:
                beps[-1][1] = int(args[i + 1])  # the exit code of the BEP before it
            i += 1
        else:
            beps.append([a, 0])
        i += 1

    P = F = S = 0
    for bep, rc in beps:
        p, f, s = count_bep(bep, per_target)
        if rc != 0 and f == 0:
            f = 1  # that phase failed (e.g. to build) although no test case did
        P, F, S = P + p, F + f, S + s
    for path in junits:
        c = count_xml(path)
        if c is None:
            c = (0, 1, 0)
        if per_target:
            print(f"{path}: {c}", file=sys.stderr)
        P, F, S = P + c[0], F + c[1], S + c[2]
    print(f"{P} passed, {F} failed, {S} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
