"""The one package-version lookup behind every output's lineage."""

from __future__ import annotations

import json

import pyarrow

from spatext.versions import package_version, package_versions


def test_versions_are_the_installed_ones_and_none_when_absent():
    assert package_version("pyarrow") == pyarrow.__version__
    assert package_version("no-such-distribution-xyz") is None
    versions = package_versions(("pyarrow", "no-such-distribution-xyz"))
    assert json.loads(json.dumps(versions)) == {"pyarrow": pyarrow.__version__, "no-such-distribution-xyz": None}
