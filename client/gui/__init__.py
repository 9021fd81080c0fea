"""The desktop chat window (``p2pchat gui``): PySimpleGUI on Tk, every call on the Tk thread.

- app: the ``gui`` command: settings and command line in, a ``ChatWindow`` out.
- window: ``ChatWindow``, its state, its read loop and ``handle``, the one event dispatcher.
  Its behaviour comes from one mixin per concern: connection (connect, sign in,
  reconnect, presence), messaging (open a conversation, send, receive, mark read), search,
  transfers (sending files and their events), received_files (open, show in folder, thumbnails,
  the received folder), key_verification (fingerprints, the changed-key
  banner), notifications (``Toast`` and when to pop one), theme_switch, and rendering
  (drawing the model and reading the screen back).
- bridge: hands the client agent's events to the Tk thread without blocking the agent.
- model: what the window shows, as plain data with its rules; no Tk (file_model: the files').
- layout (element keys and the window's build), conversation (the timeline widget),
  filecard (a file in it), theme (palettes and fonts): the look.
- settings (remembered settings, the connect form's checks), desktop (file and folder
  dialogs, the desktop's opener), dropping (files dropped on the window, through tkdnd),
  thumbnails (received images, decoded off the Tk thread): what the window keeps and what
  it asks of the desktop.
"""
