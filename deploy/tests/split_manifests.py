"""Splits `helm template --output-dir` output into one file per Kubernetes object, leaving out
the CustomResources kubernetes-validate has no schema for (listed on stdout)."""
import pathlib
import sys

import yaml

CRD_GROUPS = ("monitoring.coreos.com/",)

source, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
target.mkdir(parents=True, exist_ok=True)
count = 0
for path in sorted(source.rglob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        if doc.get("apiVersion", "").startswith(CRD_GROUPS):
            print(f"skipped (CRD, checked elsewhere): {doc['kind']} {doc['metadata']['name']}")
            continue
        count += 1
        name = f"{count:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml"
        (target / name).write_text(yaml.safe_dump(doc))
if count == 0:
    sys.exit("no manifests rendered")
