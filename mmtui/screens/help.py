"""Modal text screens: the key help (? / F1) and the equivalent command line."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]mmtui[/b]: Hugging Face checkpoints to Megatron / MindSpeed layouts, and back.

[b]Steps[/b] (tabs: click them or press the key)
  F2  Source   the direction (each mm-convert command) and the directories
  F3  Layout   TP/EP/PP/VPP, layers per stage, format; checked as you type
  F4  Preview  one row per output file; enter lists its tensors; filter
  F5  Run      progress, files done, log, summary
[b]Keys[/b]
  ctrl+b  suggest a balanced split    ctrl+r  run the conversion
  ctrl+s  save the job as TOML        ctrl+l  the mm-convert command
  ctrl+t  verify the output           ctrl+o  open another model
  escape  cancel a run / step back    tab     next field
  q       quit (asks while running)   F1 / ?  this help

Nothing is written before Run. The output goes to a temporary sibling,
renamed into place when complete: a cancelled run leaves nothing behind.
"""


class TextScreen(ModalScreen[None]):
    """A block of text over the workbench; any of escape, q, ? or F1 closes it."""

    BINDINGS = [("escape", "dismiss", "Close"), ("q", "dismiss", "Close"), ("f1", "dismiss", "Close")]
    DEFAULT_CSS = """
    TextScreen { align: center middle; }
    TextScreen > VerticalScroll {
        width: 100%; max-width: 84; height: auto; max-height: 100%;
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
