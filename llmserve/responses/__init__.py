"""OpenAI Responses API: request types, input conversion, the response store, stream events."""
