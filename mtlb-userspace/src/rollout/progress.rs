//! The rollout's progress on stdout: a step's line is begun, then finished
//! with its result; the command's output in between goes on lines of its
//! own, indented.

use std::{
    io::Write as _,
    sync::{Arc, Mutex},
};

#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Mutex<Line>>);

#[derive(Debug, Default)]
struct Line {
    /// The step begun and not finished.
    begun: Option<String>,
    /// Its line is still the last one written.
    open: bool,
}

impl Progress {
    /// Starts a step's line: "mtp2: drain …".
    pub fn begin(&self, what: String) {
        let mut l = self.lock();
        write(format_args!("{what} …"));
        l.begun = Some(what);
        l.open = true;
    }

    /// Finishes the step's line with `result`, writing the step again if
    /// other lines came in between.
    pub fn finish(&self, result: &str) {
        let mut l = self.lock();
        match (l.begun.take(), l.open) {
            (Some(_), true) => write(format_args!(" {result}\n")),
            (Some(what), false) => write(format_args!("{what} … {result}\n")),
            (None, _) => write(format_args!("{result}\n")),
        }
        l.open = false;
    }

    /// A line of its own.
    pub fn line(&self, text: &str) {
        let mut l = self.lock();
        l.close();
        write(format_args!("{text}\n"));
    }

    /// A line of the command's output, indented.
    pub fn output(&self, text: &str) {
        self.line(&format!("    {text}"));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Line> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Line {
    /// Ends a begun line, so that what follows starts a line of its own.
    fn close(&mut self) {
        if self.open {
            write(format_args!("\n"));
            self.open = false;
        }
    }
}

/// Writes to stdout and flushes (a begun line has no newline yet). A
/// closed stdout (`| head`) loses the progress, not the rollout.
fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.flush());
}
