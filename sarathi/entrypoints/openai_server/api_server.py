"""Alias: `python -m sarathi.entrypoints.openai_server.api_server` (the path the original
integration documented) runs the same server as `sarathi.entrypoints.openai.api_server`."""
from sarathi.entrypoints.openai.api_server import build_app, main, make_arg_parser  # noqa: F401

if __name__ == "__main__":
    main()
