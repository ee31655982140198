"""The Training section of NxD's tensor parallel guide (../shared/reference/nxd-tensor-parallel-guide.rst).

Run by zoo_tests/test_nxd_guides.py under `torchrun --nproc_per_node=4` (tp=2, dp=2) in a folder holding
a tiny local "bert-base-cased-finetuned-mrpc". The guide's blocks are kept as written, changed only by:
- the rename: `neuronx_distributed` -> `nxd_core` in import lines (`import nxd_core as neuronx_distributed`);
  torch_xla's `xm.optimizer_step` is `nxd_core.grads.optimizer_step` (same arguments), so
  `import torch_xla.core.xla_model as xm` becomes `import nxd_core.grads as xm`.
- transformers 5: BertSelfAttention's second parameter is now is_causal, so `super().__init__(config)`
  (the guide's position_embedding_type, None, would reach is_causal and stop the attention).
- the guide's slip `optimzer` -> `optimizer`, and its `...` in the saved dict dropped.
The guide leaves some names to the reader (the dataset, the model class, the loss, the optimizer, the
device); the glue section defines them, and the checks at the end are the test's, not the guide's.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import nxd_core as neuronx_distributed
import nxd_core.grads as xm
from nxd_core import parallel_layers
from nxd_core.parallel_layers import ColumnParallelLinear, RowParallelLinear

# -- glue: what the guide leaves to the reader ----------------------------------------------------

name = "bert-base-cased-finetuned-mrpc"  # a local folder: only its config is used
config = transformers.AutoConfig.from_pretrained(name)
input_file, max_pred_length, mini_batch_size, worker_init = None, 16, 4, None
device, max_norm, num_epochs, PATH = "cpu", 1.0, 6, "bert_tp_checkpoint"


class pretraining_dataset(Dataset):
    """64 fixed sequences, labelled by whether their second token is in the lower half of the vocabulary."""

    def __init__(self, input_file, max_pred_length):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, config.vocab_size, (64, max_pred_length), generator=generator)
        self.labels = (self.ids[:, 1] < (config.vocab_size + 5) // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return (ids, torch.ones_like(ids), torch.zeros_like(ids)), self.labels[i]


def loss_fn(output, labels):
    return F.cross_entropy(output.logits, labels)


# -- the guide: Creating DataLoader --------------------------------------------------------------

from nxd_core.parallel_layers import parallel_state  # noqa: E402  (the guide's blocks import as they go)


def create_pretraining_dataset(input_file, max_pred_length, mini_batch_size, worker_init):
    train_data = pretraining_dataset(input_file=input_file, max_pred_length=max_pred_length)
    # To distribute the data across different workers in the world,
    # we use the DistributedSampler. The num_replicas should be equal
    # to the data_parallel_world_size. Note: data_parallel_rank=0 can have
    # multiple tensor parallel ranks and each of these should get the same
    # data.
    train_sampler = DistributedSampler(
        train_data,
        num_replicas=parallel_state.get_data_parallel_world_size(),
        rank=parallel_state.get_data_parallel_rank(),
    )
    train_dataloader = DataLoader(
        train_data,
        sampler=train_sampler,
        batch_size=mini_batch_size,
        num_workers=0,
        worker_init_fn=worker_init,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),  # the guide's True warns on a host without an accelerator
    )
    return train_dataloader


# -- the guide: Creating Model -------------------------------------------------------------------


class ParallelSelfAttention(transformers.models.bert.modeling_bert.BertSelfAttention):
    def __init__(self, config, position_embedding_type=None):
        super().__init__(config)

        self.query = ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        self.key = ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        self.value = ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        # Since we shard the number of attention heads across tensor parallel
        # ranks, each rank would have a subset of heads, hence, we update
        # the num_attention_heads here.
        tp_size = parallel_state.get_tensor_parallel_size()
        self.num_attention_heads = self.num_attention_heads // tp_size
        self.all_head_size = self.all_head_size // tp_size


class ParallelSelfOutput(transformers.models.bert.modeling_bert.BertSelfOutput):
    def __init__(self, config):
        super().__init__(config)
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, input_is_parallel=True)


def YourNewlyBuiltParallelModel(config, seed=0):  # glue: the guide's two classes in an HF BERT
    torch.manual_seed(seed)  # every rank builds the same model: DP replicas start equal
    model = transformers.BertForSequenceClassification(config)
    for layer in model.bert.encoder.layer:
        layer.attention.self = ParallelSelfAttention(model.config)
        layer.attention.output = ParallelSelfOutput(model.config)
    return model


# -- the guide: Final Training script -----------------------------------------------------------

from nxd_core.parallel_layers import parallel_state, clip_grad_norm  # noqa: E402

neuronx_distributed.parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
dataloader = create_pretraining_dataset(input_file, max_pred_length, mini_batch_size, worker_init)

model = YourNewlyBuiltParallelModel(config)
# We have to move the model to device using this API, because when
# we move model to device using .to(device), the model parameter's
# attributes aren't preserved. This causes some of the tensor parallel
# attributes to be lost. Hence, this API takes care of preserving the
# tensor parallel attributes.
parallel_layers.move_model_to_device(model, device)

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # glue
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # glue
epoch_losses = []  # glue
for epoch in range(num_epochs):  # glue: the guide shows one pass over the data
    dataloader.sampler.set_epoch(epoch)
    losses = []
    for inputs, labels in dataloader:
        output = model(*inputs)
        loss = loss_fn(output, labels)
        loss.backward()
        # Here we use clip_grad_norm from neuronx_distributed as that
        # can handle tensor parallel ranks
        clip_grad_norm(model.parameters(), max_norm)
        # For the optimzer step, we have to pass the data_parallel group
        xm.optimizer_step(optimizer, groups=parallel_state.get_data_parallel_group(as_list=True))
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    epoch_losses.append(sum(losses) / len(losses))

# -- the guide: Saving Model ---------------------------------------------------------------------

neuronx_distributed.parallel_layers.save(
    {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": loss,
    },
    PATH,
)

# -- the test's checks ----------------------------------------------------------------------------

rank = dist.get_rank()
assert parallel_state.get_tensor_model_parallel_size() == 2 and parallel_state.get_data_parallel_size() == 2
assert epoch_losses[-1] < 0.7 * epoch_losses[0], epoch_losses  # it learned

# Data parallel replicas saw different batches; averaged gradients keep them equal.
for pname, param in model.named_parameters():
    copies = [torch.empty_like(param) for _ in range(parallel_state.get_data_parallel_size())]
    dist.all_gather(copies, param.detach().contiguous(), group=parallel_state.get_data_parallel_group())
    assert all(torch.equal(c, copies[0]) for c in copies), f"{pname} differs across data parallel replicas"

# The guide's load, into a model built with other weights: every parameter comes back.
fresh = YourNewlyBuiltParallelModel(config, seed=1)
rest = neuronx_distributed.parallel_layers.load(PATH, fresh)
for (pname, trained), (_, loaded) in zip(model.named_parameters(), fresh.named_parameters()):
    assert torch.equal(trained, loaded), f"{pname} did not load back"
assert rest["epoch"] == num_epochs - 1
if parallel_state.get_data_parallel_rank() == 0:  # the replica that saved: its last loss
    assert torch.equal(rest["loss"], loss.detach())
restored = torch.optim.AdamW(fresh.parameters(), lr=3e-3)
restored.load_state_dict(rest["optimizer_state_dict"])
assert all(
    torch.equal(restored.state_dict()["state"][i]["exp_avg"], optimizer.state_dict()["state"][i]["exp_avg"])
    for i in optimizer.state_dict()["state"]
)

# What the trained model answers, for the test to compare with the consolidated checkpoint.
model.eval()
with torch.no_grad():
    logits = model(*pretraining_dataset(None, max_pred_length)[0:8][0]).logits
if rank == 0:
    torch.save({"logits": logits, "epoch_losses": torch.tensor(epoch_losses)}, "trained_logits.pt")
print(f"rank {rank}: epoch losses {[round(x, 3) for x in epoch_losses]}")
