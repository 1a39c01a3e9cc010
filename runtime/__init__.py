"""The AgentFlow agent and what it runs on: LLM engines, tools, the sandbox, rollout and serving."""
