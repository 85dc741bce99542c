"""The guest agent (agent.S) and its builder."""
