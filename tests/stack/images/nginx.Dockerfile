# Stand-in for the official nginx image (tests/stack only): Debian's nginx-light. Like the
# official image it includes /etc/nginx/conf.d/*.conf in its http block and logs to stdout.
ARG BASE
FROM ${BASE}
RUN rm -f /etc/nginx/sites-enabled/default \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
