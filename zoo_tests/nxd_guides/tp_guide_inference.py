"""The Inference section of NxD's tensor parallel guide (../shared/reference/nxd-tensor-parallel-guide.rst).

zoo_tests/test_nxd_guides.py runs it in a folder holding a tiny local "bert-base-cased-finetuned-mrpc"
and an empty "bert" folder, then checks "tp_models" against Hugging Face. Changed from the guide:
- the rename: `import neuronx_distributed` -> `import nxd_core as neuronx_distributed`,
  `from neuronx_distributed.parallel_layers import` -> `from nxd_core.parallel_layers import`;
  `import torch_neuronx` dropped.
- transformers 5 removed `tokenizer.encode_plus` (`tokenizer(...)` is the same call) and the `torchscript=True`
  argument of from_pretrained (it made outputs tuples; `model(...)[0]` reads the logits either way), and
  BertSelfAttention's second parameter is now is_causal, so `super().__init__(config)` (the guides'
  position_embedding_type is None, which would now reach is_causal).
- the guide's own slips, which would stop it under NxD too: the first block uses `torch` and `name`
  before defining them, a comment line lost its `#`, and the last line says `paraphase`.
"""

# -- "Let's run the below block of code" -----------------------------------------------------

import torch
import transformers
from transformers import AutoTokenizer, AutoModelForSequenceClassification

name = "bert-base-cased-finetuned-mrpc"
model = AutoModelForSequenceClassification.from_pretrained(name)
torch.save({"model": model.state_dict()}, "bert/bert.pt")

# -- "Let's look at the example below" -------------------------------------------------------

import os
import nxd_core as neuronx_distributed
from nxd_core.parallel_layers import layers, parallel_state
import torch
import transformers
from transformers import AutoTokenizer, AutoModelForSequenceClassification
from transformers.models.bert.modeling_bert import BertSelfAttention, BertSelfOutput


def encode(tokenizer, *inputs, max_length=128, batch_size=1):
    tokens = tokenizer(*inputs, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return (
        torch.repeat_interleave(tokens["input_ids"], batch_size, 0),
        torch.repeat_interleave(tokens["attention_mask"], batch_size, 0),
        torch.repeat_interleave(tokens["token_type_ids"], batch_size, 0),
    )


# Create the tokenizer and model
name = "bert-base-cased-finetuned-mrpc"
tokenizer = AutoTokenizer.from_pretrained(name)


# Set up some example inputs
sequence_0 = "The company HuggingFace is based in New York City"
sequence_1 = "Apples are especially bad for your health"
sequence_2 = "HuggingFace's headquarters are situated in Manhattan"

paraphrase = encode(tokenizer, sequence_1, sequence_2)
not_paraphrase = encode(tokenizer, sequence_1, sequence_1)


def get_model():
    model = AutoModelForSequenceClassification.from_pretrained(name)

    # Here we build a model with tensor-parallel layers.
    # Note: If you already have a Model class that does this, we can use that directly
    # and load the checkpoint in it.
    class ParallelSelfAttention(BertSelfAttention):
        def __init__(self, config, position_embedding_type=None):
            super().__init__(config)
            self.query = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.key = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.value = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.num_attention_heads = self.num_attention_heads // parallel_state.get_tensor_model_parallel_size()
            self.all_head_size = self.all_head_size // parallel_state.get_tensor_model_parallel_size()

    class ParallelSelfOutput(BertSelfOutput):
        def __init__(self, config):
            super().__init__(config)
            self.dense = layers.RowParallelLinear(config.hidden_size, config.hidden_size, input_is_parallel=True)

    for layer in model.bert.encoder.layer:
        layer.attention.self = ParallelSelfAttention(model.config)
        layer.attention.output = ParallelSelfOutput(model.config)

    # Here we created a checkpoint as mentioned above. We pass sharded=False, since the checkpoint
    # we obtained is unsharded. In case you are using the checkpoint from the tensor-parallel training,
    # you can set the sharded=True, as that checkpoint will contain shards from each tp rank.
    neuronx_distributed.parallel_layers.load("bert/bert.pt", model, sharded=False)

    return model


# Note how we are passing a function that returns a model object, which needs to be traced.
# This is mainly done, since the model initialization needs to happen within the processes
# that get launched internally within the parallel_model_trace.
model = neuronx_distributed.trace.parallel_model_trace(get_model, paraphrase, tp_degree=2)

# Once traced, we now save the trace model for future inference. This API takes care
# of saving the checkpoint from each tensor parallel worker
neuronx_distributed.trace.parallel_model_save(model, "tp_models")

# We now load the saved model and will run inference against it
model = neuronx_distributed.trace.parallel_model_load("tp_models")

print(model(*paraphrase))
