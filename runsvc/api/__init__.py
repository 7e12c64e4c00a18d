"""The gRPC edge: proto ⇄ domain, errors → status, identity. Transport types stop here."""
