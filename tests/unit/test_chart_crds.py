"""The chart ships THE SAME BYTES as crds/ (the ModelEndpoint CRD and kopf's peering
CRDs) as templates that `helm upgrade` updates, with helm.sh/resource-policy: keep
(crds.keep) and nothing else added; the peering CRDs are exactly what kopf looks up."""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml
from kopf._cogs.structs import references

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelendpoint-operator"
SOURCE = REPO / "crds" / "modelendpoints.yaml"


@pytest.mark.parametrize("name,folder", [("modelendpoints.yaml", "files/crds"), ("kopf-peerings.yaml", "crds")])
def test_chart_crd_is_the_repository_crd(name, folder):
    shipped, source = CHART / folder / name, REPO / "crds" / name
    # A relative symlink, so there is one copy to edit and nothing to sync.
    assert shipped.is_symlink()
    assert shipped.resolve() == source.resolve()
    assert shipped.read_bytes() == source.read_bytes()


def test_packaged_chart_holds_the_same_crd_bytes(testbed_bin, tmp_path):
    # `helm package` (what a chart repository serves) follows the symlink: the archive
    # holds the file's content, byte for byte.
    subprocess.run([str(testbed_bin / "helm"), "package", str(CHART), "--destination", str(tmp_path)],
                   check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()})
    [archive] = tmp_path.glob("modelendpoint-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        member = tar.getmember("modelendpoint-operator/files/crds/modelendpoints.yaml")
        assert member.isfile()
        data = tar.extractfile(member).read()
        # Not in crds/, which Helm installs once and never upgrades; kopf's (unchanging)
        # peering CRDs are, since the chart creates objects of their kinds.
        assert [n for n in names if n.startswith("modelendpoint-operator/crds/")] == [
            "modelendpoint-operator/crds/kopf-peerings.yaml"]
        assert "modelendpoint-operator/values.schema.json" in names
    assert data == SOURCE.read_bytes()


def _rendered_crds(testbed_bin, *values: str, include_crds_folder: bool = False) -> dict[str, dict]:
    args = [a for v in values for a in ("--set", v)] + (["--include-crds"] if include_crds_folder else [])
    out = subprocess.run(
        [str(testbed_bin / "helm"), "template", "r", str(CHART), *args],
        check=True, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()},
    ).stdout
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(out)
            if d and d["kind"] == "CustomResourceDefinition"}


def _sources() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for name in ("modelendpoints.yaml", "kopf-peerings.yaml")
            for d in yaml.safe_load_all((REPO / "crds" / name).read_text()) if d}


def test_rendered_crd_is_the_repository_crd_plus_the_keep_policy(testbed_bin):
    crds = _rendered_crds(testbed_bin)
    assert set(crds) == {"modelendpoints.serving.modelendpoint.dev"}
    rendered = crds["modelendpoints.serving.modelendpoint.dev"]
    assert rendered["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert rendered == yaml.safe_load(SOURCE.read_text())
    # With crds/ too (what `helm install` applies first): kopf's peering CRDs, unchanged.
    everything = _rendered_crds(testbed_bin, "crds.keep=false", include_crds_folder=True)
    assert everything == _sources()


def test_crds_keep_false_and_crds_enabled_false(testbed_bin):
    crds = _rendered_crds(testbed_bin, "crds.keep=false")
    assert crds == {"modelendpoints.serving.modelendpoint.dev": yaml.safe_load(SOURCE.read_text())}
    assert _rendered_crds(testbed_bin, "crds.enabled=false") == {}


def test_peering_crds_match_what_kopf_looks_up():
    docs = list(yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text()))
    found = {(d["spec"]["group"], d["spec"]["versions"][0]["name"], d["spec"]["names"]["plural"],
              d["spec"]["scope"]) for d in docs}
    expected = set()
    for selector, scope in ((references.CLUSTER_PEERINGS_K, "Cluster"),
                            (references.NAMESPACED_PEERINGS_K, "Namespaced")):
        expected.add((selector.group, selector.version, selector.any_name, scope))
    assert found == expected
    for d in docs:
        # kopf writes the keep-alives into .status with a plain patch: no status subresource.
        assert "subresources" not in d["spec"]["versions"][0]
        status = d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True

