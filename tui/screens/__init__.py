"""One screen per module; each imports only what it shows (torch never)."""
