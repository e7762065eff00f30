"""ferryd's REST/JSON + websocket API: server and client."""
