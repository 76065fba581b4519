"""The merge-method registry: one declaration per method, validation and the README table from it."""
import math
import re
from pathlib import Path

import pytest
import torch

import mergelib as ml
from mergelib.hparams import HParam, HyperparameterError, check_number, closest
from mergelib.merging import REGISTRY, MergeMethod, method_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_is_rendered_from_the_registry():
    text = README.read_text()
    m = re.search(r"<!-- methods:begin -->\n(.*?)\n<!-- methods:end -->", text, re.S)
    assert m, "README.md lacks the <!-- methods:begin/end --> block"
    assert m.group(1) == method_table(), "README method table is stale: paste ml.method_table() between the markers"


def test_methods_and_defaults_derive_from_the_registry():
    assert ml.METHODS == tuple(REGISTRY)
    for name, spec in REGISTRY.items():
        assert isinstance(spec, MergeMethod) and spec.name == name
        assert spec.scope in ("global", "per-tensor")
        assert spec.check_hparams({}) == spec.defaults  # every default passes its own validation
        for h in spec.hparams:
            assert h.doc, (name, h.name)
    assert REGISTRY["pcb"].defaults == {"density": 0.05, "mode": "official"}
    assert REGISTRY["ties"].defaults == {"density": 0.2, "granularity": "global", "sign_rule": "mass",
                                         "trim_rule": "official"}
    assert REGISTRY["fr"].defaults["ratio"] == 0.7 and REGISTRY["fr"].default_scale == 0.7


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    pre = {"a.weight": torch.randn(4, 6, generator=g), "b.bias": torch.randn(4, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    return pre, fts


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("method, kw, msg", [
    ("task_arithmetic", {"scale": NAN}, r"method 'task_arithmetic': scale=nan .*NaN and inf are rejected"),
    ("task_arithmetic", {"scale": INF}, r"scale=inf"),
    ("task_arithmetic", {"scale": -INF}, r"scale=-inf"),
    ("task_arithmetic", {"scale": True}, r"scale=True \(bool\) is not allowed"),
    ("task_arithmetic", {"scale": "0.3"}, r"scale='0.3' \(str\) is not allowed"),
    ("task_arithmetic", {"scale": [0.3, NAN]}, r"scale\[1\]=nan"),
    ("task_arithmetic", {"scale": [0.3, "1"]}, r"scale\[1\]='1' \(str\)"),
    ("ties", {"scale": [1.0, 1.0]}, r"scale for method 'ties' must be a single float"),
    ("average", {"scale": 0.5}, r"scale must be None for method 'average'"),
    ("dare_ta", {"seed": True}, r"method 'dare_ta': seed=True \(bool\) is not allowed: expected an int"),
    ("dare_ta", {"seed": 1.0}, r"seed=1.0 \(float\)"),
    ("dare_ta", {"seed": -1}, r"seed=-1 is out of range"),
    ("dare_ta", {"p": NAN}, r"method 'dare_ta': p=nan"),
    ("dare_ta", {"p": 1.0}, r"p=1.0 is out of range: expected a finite real number in \[0, 1\)"),
    ("ties", {"density": True}, r"method 'ties': density=True \(bool\)"),
    ("ties", {"density": "0.2"}, r"density='0.2' \(str\)"),
    ("ties", {"density": NAN}, r"density=nan"),
    ("ties", {"density": 0.0}, r"density=0.0 is out of range: expected a finite real number in \(0, 1\]"),
    ("ties", {"granularity": "row"}, r"granularity='row' is not allowed: expected one of \('global', 'tensor'\)"),
    ("ties", {"sign_rule": 1}, r"sign_rule=1"),
    ("pcb", {"density": NAN}, r"method 'pcb': density=nan"),
    ("pcb", {"density": 1.5}, r"density=1.5 is out of range"),
    ("fr", {"ratio": INF}, r"method 'fr': ratio=inf"),
    ("fr", {"ratio": True}, r"ratio=True \(bool\)"),
    ("fr", {"ratio": -0.1}, r"ratio=-0.1 is out of range: expected a finite real number in \[0, inf\)"),
    ("fr", {"compat_official": 1}, r"compat_official=1 is not allowed: expected True or False"),
])
def test_bad_hyperparameters_raise_named_errors(small, method, kw, msg):
    pre, fts = small
    with pytest.raises(HyperparameterError, match=msg):
        ml.merge(pre, fts, method, **kw)


@pytest.mark.parametrize("method, kw, exc, msg", [
    ("tie", {}, ValueError, r"unknown method 'tie' \(did you mean 'ties'\?\); expected one of \('average'"),
    ("TIES", {}, ValueError, r"unknown method 'TIES' \(did you mean 'ties'\?\)"),
    ("task-arithmetic", {}, ValueError, r"\(did you mean 'task_arithmetic'\?\)"),
    ("averaging", {}, ValueError, r"\(did you mean 'average'\?\)"),
    ("ties", {"densty": 0.2}, TypeError,
     r"\['densty'\] for method 'ties' \(did you mean 'density' for 'densty'\?\); allowed: \['density', "),
    ("ties", {"densty": 0.2, "sign-rule": "mass", "foo": 1}, TypeError,
     r"\['densty', 'foo', 'sign-rule'\] for method 'ties' \(did you mean 'density' for 'densty', 'sign_rule' for "
     r"'sign-rule'\?\)"),
    ("ties", {"granularity": "Global"}, HyperparameterError,
     r"granularity='Global' is not allowed: expected one of \('global', 'tensor'\) \(did you mean 'global'\?\)"),
    ("fr", {"mode": "offical"}, HyperparameterError, r"\(did you mean 'official'\?\)"),
])
def test_a_mistyped_name_gets_the_closest_one_as_a_hint(small, method, kw, exc, msg):
    pre, fts = small
    with pytest.raises(exc, match=msg):
        ml.merge(pre, fts, method, **kw)


@pytest.mark.parametrize("method, kw", [
    ("dare", {}),  # as far from dare_ta as from dare_ties: no guess
    ("ties", {"trim": "tensor"}),  # renamed to granularity; trim_rule is something else
    ("pcb", {"ratio": 0.1}),  # the PCB paper's ratio r is density here: not a spelling to guess from
    ("ties", {"granularity": "row"}),
    (3, {}),
])
def test_no_hint_where_no_name_is_close(small, method, kw):
    pre, fts = small
    with pytest.raises((ValueError, TypeError)) as e:
        ml.merge(pre, fts, method, **kw)
    assert "did you mean" not in str(e.value)
    assert closest(None, ["a"]) is None and closest("ties", []) is None and closest("b", ["a"]) is None


def test_hyperparameter_error_is_a_value_error_and_good_values_pass(small):
    assert issubclass(HyperparameterError, ValueError)
    pre, fts = small
    out = ml.merge(pre, fts, "task_arithmetic", scale=torch.tensor(0.5))  # a 0-d tensor is a number
    ref = ml.merge(pre, fts, "task_arithmetic", scale=0.5)
    assert all(torch.equal(out[k], ref[k]) for k in pre)
    assert check_number(3, "n", kind=int) == 3 and check_number(0.5, "x") == 0.5
    with pytest.raises(HyperparameterError):
        check_number(torch.tensor(True), "x")
    with pytest.raises(ValueError, match="choices go with kind='choice'"):
        HParam("x", "float", 0.1, choices=("a",))
    with pytest.raises(HyperparameterError):  # a declaration whose default breaks its own range
        HParam("x", "float", 2.0, low=0.0, high=1.0)
    assert not math.isnan(REGISTRY["ties"].check_hparams({"density": 1})["density"])
