"""HTTP plumbing, nothing about generation: errors in OpenAI's shape, the OpenAPI document,
middleware (API key, body limit, drain, request log, route metrics), the queue limit, client
disconnects, server-sent events, graceful shutdown, keep-alive and fault injection."""
