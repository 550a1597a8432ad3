#!/usr/bin/env python3
"""Validate OCSF events against the OCSF schema, offline.

Reads a JSON array of events (or JSON lines) on standard input; prints a JSON
array of error messages (empty: every event is valid) and exits 0, or exits 1
with the reason when it cannot validate at all.

Each event is checked against the JSON Schema of its class
(`class_uid`), in the OCSF version its `metadata.version` names, with the
profiles its `metadata.profiles` lists. The schemas come from the PyPI
package `ocsf-json-schema` (scripts/setup.sh installs it), which ships the
OCSF schema exports (schema.ocsf.io, Apache-2.0) of every 1.x release and
turns a class into a JSON Schema 2020-12 document; Python's `jsonschema`
(already installed for the event schema) validates against it. Nothing is
downloaded at test time.

`--version V` validates against OCSF V instead of the version each event
names (to check that events also read as another release's).
"""
import json
import sys

from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema


def main() -> int:
    override = None
    if len(sys.argv) == 3 and sys.argv[1] == "--version":
        override = sys.argv[2]
    text = sys.stdin.read().strip()
    if text.startswith("["):
        events = json.loads(text)
    else:
        events = [json.loads(line) for line in text.splitlines() if line.strip()]
    schemas = {}
    validators = {}
    errors = []
    for i, event in enumerate(events):
        meta = event.get("metadata") or {}
        version = override or meta.get("version")
        if not version:
            errors.append(f"event {i}: no metadata.version")
            continue
        if version not in schemas:
            schemas[version] = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=version))
        schema = schemas[version]
        try:
            class_name = schema.lookup_class_name_from_uid(class_uid=event.get("class_uid"))
        except Exception as e:  # an unknown class
            errors.append(f"event {i}: class_uid {event.get('class_uid')!r}: {e}")
            continue
        profiles = tuple(meta.get("profiles") or ())
        key = (version, class_name, profiles)
        if key not in validators:
            js = schema.get_class_schema(class_name=class_name, profiles=list(profiles))
            Draft202012Validator.check_schema(js)
            validators[key] = Draft202012Validator(js)
        for e in validators[key].iter_errors(event):
            path = "/".join(str(p) for p in e.absolute_path)
            errors.append(
                f"event {i} ({class_name}, OCSF {version}): {e.message} at /{path}: "
                f"{json.dumps(event)[:1500]}"
            )
    print(json.dumps(errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
