"""Checkpoint formats, a reader and a writer each, so the planner never sees a byte layout:

- safetensors: `safetensors_header` (reader: headers checked by the crate's rules), `safetensors_writer`;
- Megatron rank files (torch zip): `mm_source` (reader: restricted unpickler, `.bin` weights too),
  `torch_zip` (writer, streaming);
- torch.distributed.checkpoint: `dcp_reader`, `dcp_writer` (with `dcp_index`, the `.metadata` both DCP writers write);
- Megatron-Core's torch_dist: `torch_dist_reader`, `torch_dist_writer` (with `torch_dist_names`, `torch_dist_pickle`);

and what makes a user's file safe to read at all: `regular_file` (no FIFOs or devices), `strict_json`
(no duplicate keys), `record_check` (every rank-file byte against its zip record's CRC-32).
"""
