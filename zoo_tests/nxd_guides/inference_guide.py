"""The code of NxD's inference guide (../shared/reference/nxd-inference-guide.txt), in its order.

zoo_tests/test_nxd_guides.py runs it in a folder holding a tiny local "bert-base-cased-finetuned-mrpc"
and checks what it saved against Hugging Face. Changed from the guide, and nothing else:
- the rename: `import neuronx_distributed` -> `import nxd_core as neuronx_distributed`,
  `from neuronx_distributed.parallel_layers import` -> `from nxd_core.parallel_layers import`,
  `torch_neuronx.BucketModelConfig` -> `nxd_core.bucketing.BucketModelConfig`; `import torch_neuronx` dropped.
- transformers 5 removed `tokenizer.encode_plus` (`tokenizer(...)` is the same call) and the `torchscript=True`
  argument of from_pretrained (it made outputs tuples; `model(...)[0]` reads the logits either way), and
  BertSelfAttention's second parameter is now is_causal, so `super().__init__(config)` (the guides'
  position_embedding_type is None, which would now reach is_causal).
- code the guide's text lost (the first block's torch.save and file name, encode's arguments,
  ParallelSelfOutput's body, the bucket kernel's `break`s and `torch.cat`, `from typing import List`)
  is written as in the tensor parallel guide, which has the same code whole.
- the weight-separated and bucketed models are saved beside "tp_models" ("#rest is the same" in the
  guide would overwrite it), so the test can check each.
- loading the bucketed model passes its bucket_config again: a custom kernel is code, which the zoo
  does not store in a saved model (NxD kept it inside the TorchScript archive).
"""

# -- "Let's run the below block of code" -----------------------------------------------------

import torch
import transformers
from transformers import AutoTokenizer, AutoModelForSequenceClassification

name = "bert-base-cased-finetuned-mrpc"

model = AutoModelForSequenceClassification.from_pretrained(name)
torch.save({"model": model.state_dict()}, "bert.pt")

# -- Creating a Tensor Parallel (TP) Model ----------------------------------------------------

import os
from typing import List

import torch
import transformers
from transformers import AutoTokenizer, AutoModelForSequenceClassification
from transformers.models.bert.modeling_bert import BertSelfAttention, BertSelfOutput

import nxd_core as neuronx_distributed
from nxd_core.parallel_layers import layers, parallel_state


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
    neuronx_distributed.parallel_layers.load("bert.pt", model, sharded=False)

    # These io aliases would enable us to mark certain input tensors as state tensors. These
    # state tensors are going to be device tensors.
    io_aliases = {}
    return model, io_aliases


# -- Tracing the Tensor Parallel (TP) Model ---------------------------------------------------

if __name__ == "__main__":
    # Note how we are passing a function that returns a model object, which needs to be traced.
    # This is mainly done, since the model initialization needs to happen within the processes
    # that get launched internally within the parallel_model_trace.
    model = neuronx_distributed.trace.parallel_model_trace(get_model, paraphrase, tp_degree=2)

    # Once traced, we now save the trace model for future inference. This API takes care
    # of saving the checkpoint from each tensor parallel worker
    neuronx_distributed.trace.parallel_model_save(model, "tp_models")

    # We now load the saved model and will run inference against it
    model = neuronx_distributed.trace.parallel_model_load("tp_models")
    cpu_model = AutoModelForSequenceClassification.from_pretrained(name)
    assert torch.argmax(model(*paraphrase)[0]) == torch.argmax(cpu_model(*paraphrase)[0])

# -- Weight separation --------------------------------------------------------------------------

if __name__ == "__main__":
    model = neuronx_distributed.trace.parallel_model_trace(get_model, paraphrase, tp_degree=2, inline_weights_to_neff=False)
    neuronx_distributed.trace.parallel_model_save(model, "tp_models_separated")

# -- Autobucketing ---------------------------------------------------------------------------


def sequence_length_bucket_kernel(tensor_list: List[torch.Tensor]):
    x = tensor_list[0]
    bucket_dim = 1
    x_shape = x.shape
    tensor_sequence_length = x_shape[bucket_dim]
    batch_size = x_shape[bucket_dim - 1]
    buckets = [128, 512]
    idx = 0
    num_inputs = 3
    bucket = buckets[0]
    reshaped_tensors: List[torch.Tensor] = []
    bucket_idx = 0
    for idx, bucket in enumerate(buckets):
        if tensor_sequence_length <= bucket:
            bucket_idx = idx
            for tensor in tensor_list:
                if num_inputs == 0:
                    break
                delta = bucket - tensor_sequence_length
                padding_shape: List[int] = [batch_size, delta]
                zeros = torch.zeros(padding_shape, dtype=x.dtype)
                reshaped_tensors.append(torch.cat([tensor, zeros], dim=bucket_dim))
                num_inputs -= 1
            break
    return reshaped_tensors, torch.tensor([bucket_idx])


def get_bucket_kernel(*_):
    bk = torch.jit.script(sequence_length_bucket_kernel)
    return bk


# same encode function
paraphrase = encode(tokenizer, sequence_1, sequence_2)
paraphrase_long = encode(tokenizer, sequence_1, sequence_2, max_length=512)

if __name__ == "__main__":
    # same as original main function

    bucket_config = neuronx_distributed.bucketing.BucketModelConfig(get_bucket_kernel)

    # note: inline_weights_to_neff must be set to False, otherwise a ValueError is raised
    model = neuronx_distributed.trace.parallel_model_trace(
        get_model, [paraphrase, paraphrase_long], inline_weights_to_neff=False, bucket_config=bucket_config, tp_degree=2
    )

    # rest is the same
    neuronx_distributed.trace.parallel_model_save(model, "tp_models_bucketed")
    model = neuronx_distributed.trace.parallel_model_load("tp_models_bucketed", bucket_config=bucket_config)
    cpu_model = AutoModelForSequenceClassification.from_pretrained(name)
    assert torch.argmax(model(*paraphrase)[0]) == torch.argmax(cpu_model(*paraphrase)[0])
