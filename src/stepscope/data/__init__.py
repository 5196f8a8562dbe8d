"""Small data bundled with stepscope: an example reasoning record (written for stepscope, no third-party text)."""

from pathlib import Path


def example_path() -> Path:
    """A JSONL file with one short reasoning record (question and a think-tagged response)."""
    return Path(__file__).with_name("example.jsonl")
