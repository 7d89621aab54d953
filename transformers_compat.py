"""Every difference between transformers 4.57 and 5.x that the Honeybee files meet, one function each.

The rest of the code reads as if there were one version of transformers: where the two disagree it calls a function
here, whose docstring says which version needs what and why. Shipped to the Hub with the model files (a flat module,
imported relatively), so a Hub folder loads on both versions whichever one wrote it.
"""

import transformers
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def attention_registry_resolves_names():
    """Whether `ALL_ATTENTION_FUNCTIONS.get_interface(name, default)` exists: 5.x's registry checks the name and can
    load a kernel from the Hub through it; 4.57's registry is a plain mapping, indexed by the name.

    The lookups themselves stay in modeling_honeybee.py: both versions allow `set_attn_implementation` only when they
    find those very calls in the model's own source file (`PreTrainedModel._can_set_attn_implementation`).
    """
    return hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface")


def tied_weights_keys(head, embeddings):
    """`_tied_weights_keys` for a head tied to the embeddings: 4.57 reads a list of the tied parameters, 5.x a
    {target: source} dict (as each version's LLaVA)."""
    return [head] if TRANSFORMERS_MAJOR < 5 else {head: embeddings}


def keep_in_fp32_modules(names, prefix):
    """A submodel's `_keep_in_fp32_modules` seen from its parent, whose attribute `prefix` holds it. 5.x matches the
    quantizers' skip list from the root of the module names, so it needs `prefix.name`; 4.57 matches a bare name
    anywhere in them (and accepts only bare names)."""
    return list(names) if TRANSFORMERS_MAJOR < 5 else [f"{prefix}.{name}" for name in names]


def lm_head_tp_plan():
    """`_tp_plan` for a causal-LM head, as each version's Llama: 5.x renamed "colwise_rep" (a column-sharded
    linear whose output is gathered) to "colwise_gather_output"."""
    return {"lm_head": "colwise_rep" if TRANSFORMERS_MAJOR < 5 else "colwise_gather_output"}


def image_features_return_dict_default():
    """What `get_image_features` returns when not told: 4.57's LLaVA returns the projected features (a tensor),
    5.x's a `BaseModelOutputWithPooling` (callers there read `.pooler_output`)."""
    return TRANSFORMERS_MAJOR >= 5
