"""Start the llmserve server: `python server.py --model_name <file.gguf>`."""

import sys

from llmserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
