"""help() on every public op shows what a caller needs: arguments with shapes, what it returns, and what it
raises (the function docstring holds them; the module docstring only routes to it)."""

import inspect

import pytest

import grace_kernels as gk

OPS = ["gated_dkd_loss", "fused_linear_grace_loss", "cka", "rcka_loss", "lsq_fake_quant", "w4a16_matmul",
       "w8a16_matmul"]


@pytest.mark.parametrize("name", OPS)
def test_public_op_docstring_states_arguments_shapes_and_errors(name):
    fn = getattr(gk, name)
    doc = inspect.getdoc(fn) or ""
    assert "Args:" in doc, f"{name}: no Args section"
    assert "[" in doc and "]" in doc, f"{name}: no shapes"
    assert "ValueError" in doc or "Raises" in doc, f"{name}: no errors stated"
    for param in inspect.signature(fn).parameters:
        if param not in ("args", "kwargs") and inspect.signature(fn).parameters[param].default is inspect._empty:
            assert param in doc, f"{name}: required argument {param!r} is not documented"


@pytest.mark.parametrize("name", ["gated_dkd_loss", "fused_linear_grace_loss", "cka"])
def test_kd_and_cka_math_lives_in_the_function_docstring(name):
    fn = getattr(gk, name)
    doc, module_doc = inspect.getdoc(fn), inspect.getdoc(inspect.getmodule(fn))
    assert "Math" in doc and "Raises" in doc
    assert "Math" not in module_doc and "Raises" not in module_doc  # one home for the text
