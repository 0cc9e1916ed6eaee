"""What the wizard's screen holds: its tabs, fields and the words they show (screens/workbench.py
does the work). Kept apart so the screen's module is about behaviour, this one about layout."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, Select, Static, TabbedContent, TabPane

from ..widgets.preview import PlanPreview
from ..widgets.run_panel import RunPanel
from ..widgets.stage_grid import StageGrid
from ..widgets.write_options import WriteOptions

DIRECTIONS = [
    ("HF → Megatron / MindSpeed", "hf_to_mm"),
    ("Megatron → HF", "mm_to_hf"),
    ("Re-split Megatron", "resplit"),
    ("HF → torch DCP (resharded at load)", "hf_to_dcp"),
    ("torch DCP → HF (FSDP2 or hf_to_dcp's)", "dcp_to_hf"),
    ("Merge a LoRA adapter into HF", "merge_lora"),
    ("LoRA adapter: PEFT → Megatron", "lora_hf_to_mm"),
    ("LoRA adapter: Megatron → PEFT", "lora_mm_to_hf"),
]
COSTS = [("parameters", "params"), ("forward FLOPs", "flops")]
# the inputs a problem can mark
INPUTS = ("tp", "ep", "pp", "vpp", "src", "src_tp", "src_ep", "src_llm", "src_vit", "src_audio", "out", "hf_dir")
INPUTS += ("lora", "lora_r", "lora_alpha", "vit_tokens", "llm_tokens", "dp", "device_gib")
DISK_FILLS = ("mm_to_hf", "resplit", "lora_mm_to_hf")  # directions whose source layout is on a disk
TABS = ["source", "layout", "preview", "run"]
SHORT = {"vit": "ViT", "audio": "Audio", "llm": "LLM"}
OUT_SUFFIX = {
    "hf_to_mm": "-mm",
    "mm_to_hf": "-hf",
    "resplit": "-resplit",
    "hf_to_dcp": "-dcp",
    "dcp_to_hf": "-hf",
    "merge_lora": "-merged",
    "lora_hf_to_mm": "-mm",
    "lora_mm_to_hf": "-peft",
}
OUT_FROM = {"mm_to_hf": "src", "resplit": "src", "lora_mm_to_hf": "src", "dcp_to_hf": "src", "lora_hf_to_mm": "lora"}
# else hf_dir
LAYOUT_CAPTION = {
    "hf_to_mm": "Layout to write",
    "mm_to_hf": "Layout of the Megatron checkpoint being read (as it was written)",
    "resplit": "Layout to write (the source layout is on the Source tab)",
    "hf_to_dcp": "No layout: a torch.distributed.checkpoint is resharded when it is loaded",
    "dcp_to_hf": "No layout: a torch DCP checkpoint is read whole, however many ranks saved it",
    "merge_lora": "No layout: the merged model is Hugging Face files, sharded like the base",
    "lora_hf_to_mm": "Layout to cut the adapter for (the base model's training layout)",
    "lora_mm_to_hf": "Layout of the Megatron adapter being read (as it was written)",
}

# the source dir's label and hint: a Megatron checkpoint, or (dcp_to_hf) a torch DCP one
SRC_WORDS = {
    "dcp_to_hf": ("DCP dir", "holds .metadata, or latest_checkpointed_iteration.txt"),
}
SRC_DEFAULT = ("Megatron dir", "holds latest_checkpointed_iteration.txt")

# mm_to_hf of a torch_dist checkpoint: its global tensors are read whole, whatever layout it was trained with
TORCH_DIST_CAPTION = "torch_dist: tensors that do not depend on a layout, read as TP 1, one stage"


def _field(label: str | Label, widget, *classes: str, after: Label | None = None) -> Horizontal:
    head = label if isinstance(label, Label) else Label(label)
    return Horizontal(head, widget, *([after] if after else []), classes=" ".join(("row", *classes)))


def compose_tabs(hf_dir: Path | None, out_dir: Path | None) -> ComposeResult:
    """Source -> Layout -> Preview -> Run."""
    with TabbedContent(initial="source", id="tabs"):
        with TabPane("Source F2", id="source"), Horizontal(id="source-top"):
            with Vertical(id="form"):
                direction = Select(DIRECTIONS, value="hf_to_mm", allow_blank=False, id="direction")
                yield _field("Direction", direction)
                yield _field("HF dir", Input(str(hf_dir or ""), id="hf_dir", placeholder="path, enter"))
                src = Input(id="src", placeholder=SRC_DEFAULT[1])
                head = Label(SRC_DEFAULT[0], id="src-label")
                yield _field(head, src, "needs-src", after=Label("", id="src-format"))  # what was read
                yield _field("Source TP", Input("1", id="src_tp"), "needs-src-layout")
                yield _field("Source EP", Input("1", id="src_ep"), "needs-src-layout", "needs-experts")
                yield _field("Source LLM", Input(id="src_llm", placeholder="[[1,3]]"), "needs-src-layout")
                src_vit = Input(id="src_vit", placeholder="[[3,0]]")
                yield _field("Source ViT", src_vit, "needs-src-layout", "needs-vit")
                src_audio = Input(id="src_audio", placeholder="[[1,2]]")
                yield _field("Source audio", src_audio, "needs-src-layout", "needs-audio")
                lora = Input(id="lora", placeholder="optional: a PEFT adapter to merge in")
                yield _field("LoRA adapter", lora, "needs-lora")
                rank = Input(id="lora_r", placeholder="only for an adapter mmtui did not write", restrict=r"\d*")
                yield _field("LoRA r", rank, "needs-lora-rank")
                alpha = Input(id="lora_alpha", placeholder="its --lora-alpha")
                yield _field("LoRA alpha", alpha, "needs-lora-rank")
                yield _field("Output dir", Input(str(out_dir or ""), id="out"))
                hf_dtype = Checkbox("write HF dir's dtypes (FSDP2 float32 → bf16)", id="hf_dtype")
                yield _field("", hf_dtype, "needs-dcp")
                yield _field("", Checkbox("overwrite a non-empty output dir", id="overwrite"))
            with VerticalScroll(id="summary-box"):
                yield Static("Give a Hugging Face model directory and press enter.", id="summary")
        with TabPane("Layout F3", id="layout"):
            with Horizontal(id="layout-top", classes="needs-layout"):
                yield Label("TP")
                yield Input("1", id="tp", restrict=r"\d*")
                yield Label("EP", classes="needs-experts")
                yield Input("1", id="ep", restrict=r"\d*", classes="needs-experts")
                yield Label("PP")
                yield Input("1", id="pp", restrict=r"\d*")
                yield Label("VPP")
                yield Input("1", id="vpp", restrict=r"\d*")
                yield Select(COSTS, value="params", allow_blank=False, id="cost")
                yield Button("Suggest", id="suggest", variant="primary")
            with Horizontal(id="layout-opts", classes="needs-layout"):
                yield Label("ViT tokens", classes="needs-flops needs-vit")
                yield Input("1024", id="vit_tokens", restrict=r"\d*", classes="needs-flops needs-vit")
                yield Label("LLM tokens", classes="needs-flops")
                yield Input("4096", id="llm_tokens", restrict=r"\d*", classes="needs-flops")
                yield Label("DP")
                yield Input("", id="dp", placeholder="= EP", restrict=r"\d*")
                yield Label("device GiB")
                yield Input("", id="device_gib", placeholder="e.g. 64", restrict=r"[\d.]*")
            yield WriteOptions(id="write-opts", classes="needs-write")
            yield Static(LAYOUT_CAPTION["hf_to_mm"], id="layout-caption")
            yield StageGrid([], {"llm": [[0]]}, id="grid", classes="needs-layout")
            yield Static("", id="flags", classes="needs-layout")
            yield Static("", id="fits", classes="needs-layout")
        with TabPane("Preview F4", id="preview-tab"):
            yield PlanPreview(id="plan-preview")
        with TabPane("Run F5", id="run"):
            yield RunPanel(id="runpanel")
