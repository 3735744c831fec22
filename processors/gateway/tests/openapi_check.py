"""Checks the gateway's OpenAPI document with a real validator, and real answers against it.

Usage: openapi_check.py DOC.json SAMPLES.json

DOC.json is what GET /openapi.json served. SAMPLES.json is a list of answers the running
gateway gave: {"method", "path" (the template), "status", "content_type", "body" (JSON or
null)}. Prints one JSON object: {"version", "errors": [...]}; errors is empty when the
document is a valid OpenAPI 3.1 document and every answer's status, content type and body
are what the document says.
"""

import json
import sys

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOC_URI = "urn:presence:openapi"


def pointer(*parts):
    return "#/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def main():
    doc = json.load(open(sys.argv[1]))
    samples = json.load(open(sys.argv[2]))
    errors = []
    try:
        validate(doc)
    except Exception as e:  # the validator's own error types differ between versions
        errors.append(f"the document is not valid OpenAPI: {e}")
    if not str(doc.get("openapi", "")).startswith("3.1"):
        errors.append(f"openapi is {doc.get('openapi')!r}, not 3.1.x")
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; $refs point into the document itself.
    registry = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    for s in samples:
        where = f"{s['method'].upper()} {s['path']} -> {s['status']}"
        op = doc.get("paths", {}).get(s["path"], {}).get(s["method"])
        if op is None:
            errors.append(f"{where}: the operation is not in the document")
            continue
        response = op.get("responses", {}).get(str(s["status"]))
        if response is None:
            errors.append(f"{where}: the status is not among the documented responses {sorted(op.get('responses', {}))}")
            continue
        content = response.get("content", {})
        ctype = (s.get("content_type") or "").split(";")[0].strip()
        if content and ctype not in content:
            errors.append(f"{where}: content type {ctype!r} is not documented ({sorted(content)})")
            continue
        if s.get("body") is None or not content:
            continue
        schema = {"$ref": DOC_URI + pointer("paths", s["path"], s["method"], "responses", str(s["status"]), "content", ctype, "schema")}
        validator = Draft202012Validator(schema, registry=registry)
        for e in validator.iter_errors(s["body"]):
            errors.append(f"{where}: the body does not fit the documented schema at {list(e.absolute_path)}: {e.message}")
    print(json.dumps({"version": doc.get("openapi"), "errors": errors}))


if __name__ == "__main__":
    main()
