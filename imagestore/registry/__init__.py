"""Registry client (distribution API v2): auth, pull and push."""
