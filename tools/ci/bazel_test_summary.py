#!/usr/bin/env python3
"""Summarise `bazel test --build_event_json_file=BEP ...` as one line:
    N passed, N failed, N skipped
Counts GoogleTest cases from each test target's test.xml as listed in the BEP
of *this* invocation (stale bazel-testlogs are never read). A test target
without a usable test.xml counts as one case; a test target that produced no
result counts as one failed case if it failed to build or was aborted, and as
one skipped case if Bazel filtered it out (tag filters, e.g. the GPU tests). With
--bazel-exit-code N, a non-zero N with no failed case adds one failure, so a
red run never reads "0 failed" (e.g. a non-test target failed to build).
Usage: bazel_test_summary.py BEP.json [--per-target] [--bazel-exit-code N]
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


def main():
    bep = sys.argv[1]
    per_target = "--per-target" in sys.argv
    bazel_rc = 0
    if "--bazel-exit-code" in sys.argv:
        bazel_rc = int(sys.argv[sys.argv.index("--bazel-exit-code") + 1])

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
    if bazel_rc != 0 and F == 0:
        F = 1
    print(f"{P} passed, {F} failed, {S} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
