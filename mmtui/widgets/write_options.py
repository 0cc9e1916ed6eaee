"""What a Megatron checkpoint is written as, beside its layout: legacy rank files (what MindSpeed-MM and
MindSpeed-LLM load) or Megatron-Core's torch_dist (Megatron-LM's default), and for a mixture of experts the
routed experts' grouped-GEMM layout. Choices only: whether a model can be written so is the engine's answer,
shown with the other problems."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Select

FORMATS = [("legacy mp_rank files", "legacy"), ("torch_dist (Megatron-Core)", "torch_dist")]
FORMAT_TITLE = {value: title for title, value in FORMATS}
FORMAT_USERS = {"legacy": "for MindSpeed-MM / MindSpeed-LLM", "torch_dist": "for Megatron-LM"}
WRITES_FORMAT = ("hf_to_mm", "resplit")  # the directions whose job config has a `format` to write
# parallel_config.moe_grouped_gemm: SequentialMLP's local experts, GroupedMLP's weight1/2, TEGroupedMLP's weightN
GROUPED_GEMM = [("off", "off"), ("legacy", "legacy"), ("te", "te")]


class WriteOptions(Horizontal):
    DEFAULT_CSS = """
    WriteOptions { height: 1; }
    WriteOptions Label { width: auto; margin: 0 1 0 1; }
    WriteOptions #format { width: 30; height: 1; }
    WriteOptions #format-users { color: $text-muted; }
    WriteOptions #grouped_gemm { width: 12; height: 1; }
    WriteOptions Select.-invalid > SelectCurrent { background: $error 30%; }
    """

    def compose(self) -> ComposeResult:
        yield Label("Write as")
        yield Select(FORMATS, value="legacy", allow_blank=False, id="format", compact=True)
        yield Label("grouped GEMM", classes="needs-experts")
        gemm = Select(GROUPED_GEMM, value="off", allow_blank=False, id="grouped_gemm", compact=True)
        yield gemm.add_class("needs-experts")
        yield Label(FORMAT_USERS["legacy"], id="format-users")

    @property
    def value(self) -> str:
        return str(self.query_one("#format", Select).value)

    @property
    def grouped_gemm(self) -> str:
        """off, legacy or te (what the screen shows only for a model with experts)."""
        return str(self.query_one("#grouped_gemm", Select).value)

    @on(Select.Changed, "#format")
    def _format_changed(self) -> None:  # the event goes on to the screen, which plans the new choice
        self.query_one("#format-users", Label).update(FORMAT_USERS[self.value])
