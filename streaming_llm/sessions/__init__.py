"""Sessions: endless chats on a row of the engine, chat templates, memory beyond the window, session files."""
