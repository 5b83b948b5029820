"""The private formats the checkpoint layer writes or reads without PyTorch's and megatron-core's own code.

A torch_dist checkpoint is PyTorch Distributed Checkpoint (DCP) data: `.metadata` (a pickle of
`torch.distributed.checkpoint.metadata.Metadata`) and `.distcp` data files in which every tensor chunk is a
`torch.save` archive. The conversion's direct paths and the merge of round saves depend on details of those
formats that neither library documents as stable, so each is kept in one module here, with the exact behaviour it
relies on written at its top:

- `archive`: torch.save's archive of one contiguous tensor, made without torch (the direct import's writer);
- `index`:   `.metadata` and each chunk's archive read without torch (the direct export's reader);
- `merge`:   DCP metadata of several saves merged into one, and chunks written elsewhere added to it.

Tested against the installed torch (torch 2.13.0 in CI: `tests/unit/test_dcp_archive.py`, the direct-conversion tests
in `tests/distributed`). On other versions nothing is trusted blindly: the direct import reads one of its archives
back with `torch.load(weights_only=True)` and checks its layout against megatron-core's sharded state dict before it
commits (`direct_import.py`), the index refuses what it does not recognise (`index.Unreadable`), and either falls
back to the regular path (megatron-core's own writer and reader) with a one-line notice.
"""
