"""The transformers range is one statement: pyproject declares it, the README repeats it, the tests run inside it,
and nothing it allows removes what the seed loop uses (``past_key_values=``, announced for removal by transformers
itself)."""

from __future__ import annotations

import inspect
import re
import tomllib
import warnings

import pytest
import torch
import transformers
from conftest import REPO, tiny_llama
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from streaming_llm.core.architectures import SUPPORTED


def declared() -> SpecifierSet:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [d for d in dependencies if re.match(r"transformers\b", d)]
    return SpecifierSet(requirement.removeprefix("transformers"))


def bounds(spec: SpecifierSet) -> tuple[Version, Version]:
    lower = [Version(s.version) for s in spec if s.operator == ">="]
    upper = [Version(s.version) for s in spec if s.operator == "<"]
    assert len(lower) == 1 and len(upper) == 1, f"declare transformers as '>=LOW,<HIGH', not {spec}"
    return lower[0], upper[0]


def test_the_installed_transformers_is_inside_the_declared_range():
    assert Version(transformers.__version__) in declared()


def test_the_readme_states_the_declared_range():
    lower, upper = bounds(declared())
    text = " ".join((REPO / "README.md").read_text().split())
    assert f"transformers >= {lower}, < {upper}" in text


def removal_versions(model_class: type) -> set[Version]:
    """Versions in which ``model_class``'s modeling file announces that ``past_key_values=`` goes away."""
    source = inspect.getsource(inspect.getmodule(model_class))
    found = re.findall(r"""@deprecate_kwarg\(\s*["']past_key_values["'],\s*(?:version=)?["']([\d.]+)["']""", source)
    return {Version(v) for v in found}


@pytest.mark.parametrize("model_type", list(SUPPORTED))
def test_no_allowed_version_removes_the_seed_loops_keyword(model_type):
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    _, upper = bounds(declared())
    for removal in removal_versions(model_class):
        assert upper <= removal, f"{model_class.__name__}: past_key_values= goes in {removal}; cap below it"


def test_the_announcement_is_the_one_read_from_the_source():
    """The seed loop's call warns with the removal version the test above reads (so that test reads the truth)."""
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, past_key_values=None, use_cache=True)
    announced = {Version(v) for w in caught for v in re.findall(r"removed in version ([\d.]+)", str(w.message))}
    assert announced <= removal_versions(type(model))
    if Version(transformers.__version__) >= Version("5.24"):
        assert announced, "transformers >= 5.24 deprecates past_key_values= (NOTES); the warning went missing"
