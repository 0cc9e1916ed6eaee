"""Modal text screens: the key help (? / F1) and the equivalent command line."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]mmtui[/b] — cut Hugging Face checkpoints into Megatron / MindSpeed layouts, and back.

[b]Steps[/b] (tabs; click them or press the key)
  F2  Source    direction: each mm-convert command (HF → MM, MM → HF, re-split,
                HF → DCP, merge a LoRA, a LoRA adapter either way); directories
  F3  Layout    TP, PP, VPP and layers per stage for each module; live validation
  F4  Preview   one row per output file; enter lists its tensors; type to filter
  F5  Run       progress, per-file completion, log, summary

[b]Keys[/b]
  ctrl+b   Suggest a balanced split (cost model: parameters or FLOPs)
  ctrl+r   Run the conversion           escape  cancel a run / previous step
  ctrl+s   Save the job as TOML         ctrl+l  show (and copy) the mm-convert command
  ctrl+t   Verify (test) the output against the source after a run
  ctrl+o   Open another model directory (a tree to pick from)
  tab / shift+tab  move between fields    q / ctrl+q  quit (asks while a run is going)
  ? / F1   this help

Nothing is written before Run; output goes to a temporary sibling and is renamed into
place when complete, so a cancelled run leaves nothing behind.
"""


class TextScreen(ModalScreen[None]):
    """A block of text over the workbench; any of escape, q, ? or F1 closes it."""

    BINDINGS = [("escape", "dismiss", "Close"), ("q", "dismiss", "Close"), ("f1", "dismiss", "Close")]
    DEFAULT_CSS = """
    TextScreen { align: center middle; }
    TextScreen > VerticalScroll {
        width: 90%; max-width: 100; height: auto; max-height: 90%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    """

    def __init__(self, text: str, title: str) -> None:
        super().__init__()
        self.text = text
        self.title_text = title

    def compose(self) -> ComposeResult:
        with VerticalScroll() as box:
            box.border_title = self.title_text
            box.border_subtitle = "escape closes"
            yield Static(self.text, id="text")

    def key_question_mark(self) -> None:
        self.dismiss()


def help_screen() -> TextScreen:
    return TextScreen(HELP, "Help")
