"""The layers' imports point one way: the estimators work on the protocol alone, so importing
them must not load a network, the checkpoint reader or the tokenizer."""

import subprocess
import sys

HEAVY = ("colaprob.dit", "colaprob.vae", "colaprob.model", "colaprob.checkpoint", "colaprob.tokenizer", "safetensors", "tokenizers")


def test_importing_the_estimators_loads_no_network():
    code = "import sys, colaprob.estimators; print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_top_level_names_resolve_on_first_use():
    import colaprob
    from colaprob.checkpoint import load
    from colaprob.model import ColaModel

    assert colaprob.load is load and colaprob.ColaModel is ColaModel
    assert {"load", "save", "ColaModel"} <= set(dir(colaprob))
