"""Backends beyond the in-process engine: a managed llama-server child, an OpenAI-compatible
upstream, LAN peers (issue 11). They work at the request level: a chat or completion request
in, our events (TextDelta, ToolCallDelta, Finished, ...) out."""
